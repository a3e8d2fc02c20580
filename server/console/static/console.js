// The lifecycle console: one page, views picked by the URL's hash (#/adapters, ...).
//
// It talks only to the gateway's REST API with the signed-in key, so every change is
// audited as that key. Every value from the API is put on the page as text
// (textContent, text nodes): adapter names and descriptions are tenant-supplied.

import { lineChart } from "./charts.js";

const KEY = "loraplex.console.key";
const TENANT = "loraplex.console.tenant";
const $ = (selector) => document.querySelector(selector);
const enc = encodeURIComponent;

// The signed-in key and, for an admin key, the tenant whose adapters it looks at.
const session = { key: null, admin: false, tenant: null };

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${session.key}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const answer = await fetch(path, init);
  if (answer.status === 204) return null;
  const data = await answer.json().catch(() => ({}));
  if (!answer.ok) {
    // The API answers errors in OpenAI's shape: {"error": {"message", "code", ...}}.
    const error = data.error || {};
    throw new ApiError(answer.status, error.message || answer.statusText, error.code);
  }
  return data;
}

// -- building the page ----------------------------------------------------------

/** An element with attributes and children; strings become text nodes, never markup. */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value === true) node.setAttribute(name, "");
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  }
  return node;
}

function table(caption, headers, rows) {
  if (rows.length === 0) return el("p", {}, `${caption}: none.`);
  return el(
    "table",
    {},
    el("caption", {}, caption),
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) => el("td", {}, c))))),
  );
}

let sections = 0;

function section(title, ...children) {
  sections += 1; // a fresh id each time: two sections may share a title
  const id = `section-${sections}`;
  return el("section", { "aria-labelledby": id }, el("h3", { id }, title), ...children);
}

function button(label, onclick, attrs = {}) {
  return el("button", { type: "button", onclick, ...attrs }, label);
}

// Eval values and losses are floats: four significant digits read better than 0.0829999.
const num = (value) => (Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4))));
const when = (unix) => (unix ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) : "");
const iso = (text) => (text ? text.replace("T", " ").slice(0, 19) : "");

function say(message) {
  $("#status").textContent = message;
}

/** Show a refused change on the page (role=alert, so it is announced). */
function problem(message) {
  const box = $("#problem");
  if (box === null) return say(message);
  box.textContent = message;
  box.hidden = false;
}

/** Ask before a change; resolves true on Confirm. Escape or Cancel resolve false. */
function confirmed(question) {
  const dialog = $("#confirm");
  $("#confirm-text").textContent = question;
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    // Cancel has focus first: an Enter pressed without reading changes nothing.
    $("#confirm-cancel").focus();
  });
}

/** A write through the REST API behind the confirmation dialog, then the view again. */
async function change(question, method, path, body, done) {
  const box = $("#problem");
  if (box !== null) box.hidden = true; // an earlier refusal no longer applies
  if (!(await confirmed(question))) {
    say("Cancelled: nothing changed.");
    return;
  }
  try {
    await api(method, path, body);
  } catch (error) {
    const refused = error.code === "gate_failed" ? "Promotion refused by a gate: " : "Refused: ";
    problem(refused + error.message);
    return;
  }
  await render();
  say(done);
}

// -- views ------------------------------------------------------------------------

function adaptersPath() {
  return session.admin ? `/admin/tenants/${enc(session.tenant)}/adapters` : "/v1/adapters";
}

async function adaptersView() {
  if (session.admin && !session.tenant) return el("p", {}, "Pick a tenant above to see its adapters.");
  const { data } = await api("GET", adaptersPath());
  const rows = data.map((a) => [
    el("a", { href: `#/adapters/${enc(a.id)}` }, a.id),
    a.description ?? "",
    aliasSummary(a.aliases),
    iso(a.created_at),
  ]);
  return [el("h2", { tabindex: -1 }, "Adapters"), table("Adapters", ["Name", "Description", "Aliases", "Created"], rows)];
}

function aliasSummary(aliases) {
  return Object.entries(aliases)
    .map(([name, target]) => `${name} → v${target.version}${target.weight < 1 ? ` (${target.weight})` : ""}`)
    .join(", ");
}

async function adapterView(name) {
  const base = `${adaptersPath()}/${enc(name)}`;
  const [adapter, history, gates] = await Promise.all([
    api("GET", base),
    api("GET", `${base}/evals`),
    api("GET", `${base}/gates`),
  ]);
  return [
    el("h2", { tabindex: -1 }, `Adapter ${adapter.id}`),
    el("p", { class: "description" }, adapter.description ?? ""),
    el("div", { id: "problem", role: "alert", class: "problem", hidden: true }),
    section("Versions", versionsTable(adapter, history.data, base)),
    section("Aliases", aliasesTable(adapter.aliases), canaryForm(adapter, base), rollbackButton(adapter, base)),
    section("Eval results across versions", evalChart(history.data), evalTable(history.data)),
    section("Promotion gates", gatesTable(gates.data)),
  ];
}

function versionsTable(adapter, history, base) {
  const evalsOf = new Map(history.map((v) => [v.version, v.evals]));
  const production = adapter.aliases.production?.version;
  const rows = adapter.versions.map((v) => [
    `v${v.version}`,
    v.state,
    (evalsOf.get(v.version) || []).map((e) => `${e.suite}/${e.metric}=${num(e.value)}`).join(", "),
    v.created_by,
    iso(v.created_at),
    versionAction(adapter, v, production, base),
  ]);
  return table("Versions", ["Version", "State", "Latest evals", "Created by", "Created", "Action"], rows);
}

function versionAction(adapter, v, production, base) {
  if (v.version === production) return "in production";
  if (v.state !== "active") return ""; // retired and archived versions cannot take traffic
  const label = `Promote version ${v.version} to production`;
  return button(`Promote v${v.version}`, () => promote(adapter.id, v.version, base), { "aria-label": label });
}

function promote(name, version, base) {
  return change(
    `Point ${name}'s production alias at version ${version}? Its gates are checked first.`,
    "POST", `${base}/promote`, { version },
    `Version ${version} of ${name} is in production.`,
  );
}

function aliasesTable(aliases) {
  const rows = Object.entries(aliases).map(([alias, t]) => [alias, `v${t.version}`, String(t.weight)]);
  return table("Aliases", ["Alias", "Version", "Weight"], rows);
}

function canaryForm(adapter, base) {
  const active = adapter.versions.filter((v) => v.state === "active");
  const current = adapter.aliases.canary;
  const version = el("select", { id: "canary-version", name: "version" },
    active.map((v) => el("option", { value: v.version, selected: current?.version === v.version }, `v${v.version}`)));
  const weight = el("input", {
    id: "canary-weight", name: "weight", type: "number", min: 0, max: 1, step: 0.05,
    value: current ? current.weight : 0.1, required: true,
  });
  const submit = async (event) => {
    event.preventDefault();
    const [number, share] = [Number(version.value), Number(weight.value)];
    await change(
      `Send ${Math.round(share * 100)}% of ${adapter.id}'s traffic to version ${number} (canary)?`,
      "POST", `${base}/canary`, { version: number, weight: share },
      `The canary of ${adapter.id} is version ${number} at weight ${share}.`,
    );
  };
  return el("form", { class: "inline", onsubmit: submit },
    el("label", { for: "canary-version" }, "Canary version"), version,
    el("label", { for: "canary-weight" }, "Canary weight (0 to 1)"), weight,
    el("button", { type: "submit" }, "Set canary weight"));
}

function rollbackButton(adapter, base) {
  const roll = () => change(
    `Restore ${adapter.id}'s previous production version?`,
    "POST", `${base}/rollback`, undefined,
    `${adapter.id} is rolled back.`,
  );
  return el("p", {}, button("Roll back production", roll));
}

function evalSeries(history) {
  const series = new Map();
  for (const version of history) {
    for (const result of version.evals) {
      const name = `${result.suite}/${result.metric}`;
      if (!series.has(name)) series.set(name, { name, points: [] });
      series.get(name).points.push([version.version, result.value]);
    }
  }
  return [...series.values()];
}

function evalChart(history) {
  return lineChart({ title: "Latest eval results by version", series: evalSeries(history), xLabel: (x) => `v${x}` });
}

function evalTable(history) {
  const rows = history.flatMap((v) => v.evals.map((e) => [`v${v.version}`, e.suite, e.metric, num(e.value)]));
  return table("Eval results", ["Version", "Suite", "Metric", "Value"], rows);
}

function gatesTable(gates) {
  const rows = gates.map((g) => [
    g.suite, g.metric, String(g.min_value ?? ""), String(g.max_regression ?? ""),
    g.higher_is_better ? "higher" : "lower",
  ]);
  return table("Promotion gates", ["Suite", "Metric", "Minimum", "Max regression", "Better"], rows);
}

async function jobsView() {
  if (session.admin) return el("p", {}, "Fine-tuning jobs are a tenant's own: sign in with a tenant key.");
  const { data } = await api("GET", "/v1/fine_tuning/jobs?limit=100");
  const rows = data.map((j) => [
    el("a", { href: `#/jobs/${enc(j.id)}` }, j.id), j.status, j.model, j.adapter_name, when(j.created_at),
  ]);
  return [el("h2", { tabindex: -1 }, "Fine-tuning jobs"), table("Jobs", ["Job", "Status", "Base", "Adapter", "Created"], rows)];
}

async function jobView(id) {
  const path = `/v1/fine_tuning/jobs/${enc(id)}`;
  const [job, events, checkpoints] = await Promise.all([
    api("GET", path), api("GET", `${path}/events?limit=1000`), api("GET", `${path}/checkpoints`),
  ]);
  // Step events carry the training loss; checkpoints the validation loss as well.
  const steps = events.data.filter((e) => e.data && "train_loss" in e.data);
  const train = steps.map((e) => [e.data.step, e.data.train_loss]).sort((a, b) => a[0] - b[0]);
  const valid = checkpoints.data.filter((c) => c.metrics && "valid_loss" in c.metrics)
    .map((c) => [c.step_number, c.metrics.valid_loss]).sort((a, b) => a[0] - b[0]);
  const series = [{ name: "training loss", points: train }, { name: "validation loss", points: valid }];
  return [
    el("h2", { tabindex: -1 }, `Job ${job.id}`),
    el("p", {}, `${job.status}: ${job.model} → ${job.fine_tuned_model ?? job.adapter_name}`),
    section("Loss", lineChart({ title: "Loss by step", series: series.filter((s) => s.points.length) })),
    section("Events", table("Events, newest first", ["Time", "Level", "Message"],
      events.data.map((e) => [when(e.created_at), e.level, e.message]))),
  ];
}

async function loopsView() {
  if (session.admin) return el("p", {}, "Retraining loops are a tenant's own: sign in with a tenant key.");
  const { data } = await api("GET", "/v1/fine_tuning/policies");
  const rows = data.map((p) => [
    el("a", { href: `#/adapters/${enc(p.adapter)}` }, p.adapter), p.dataset,
    p.every_seconds ? `every ${p.every_seconds} s` : "", p.after_feedback ? `after ${p.after_feedback} feedback` : "",
    when(p.next_run_at), when(p.last_run_at),
    p.last_job ? el("a", { href: `#/jobs/${enc(p.last_job)}` }, p.last_job) : "", p.last_outcome ?? "",
  ]);
  const headers = ["Adapter", "Dataset", "Schedule", "Feedback trigger", "Next run", "Last run", "Last job", "Outcome"];
  return [el("h2", { tabindex: -1 }, "Retraining loops"), table("Retraining policies", headers, rows)];
}

async function upgradesView() {
  const { data } = await api("GET", session.admin ? "/admin/bases/upgrades" : "/v1/upgrades");
  const heading = el("h2", { tabindex: -1 }, "Base upgrades");
  if (data.length === 0) return [heading, el("p", {}, "No base upgrade moves these adapters.")];
  return [heading, ...data.map(upgradeSection)];
}

function upgradeSection(upgrade) {
  // An admin who picked a tenant sees that tenant's items; a tenant only ever gets its own.
  const items = upgrade.items.filter((i) => !session.admin || !session.tenant || i.tenant === session.tenant);
  const scores = (s) => Object.entries(s || {}).map(([k, v]) => `${k}=${typeof v === "number" ? num(v) : v}`).join(", ");
  const rows = items.map((i) => [
    i.tenant, i.adapter, `v${i.old_version}`, i.kind, i.state, scores(i.scores),
    i.new_version ? `v${i.new_version}` : "", iso(i.deadline), i.choice ?? "", i.note ?? "",
  ]);
  const deadline = upgrade.deadline ?? upgrade.options?.deadline;
  const headers = ["Tenant", "Adapter", "From", "Kind", "State", "Scores", "New version", "Deadline", "Choice", "Note"];
  return section(
    `${upgrade.old_base} → ${upgrade.new_base}: ${upgrade.state}`,
    el("p", {}, `Upgrade ${upgrade.id}${deadline ? `, deadline ${iso(deadline)}` : ""}`),
    table("Adapters this upgrade moves", headers, rows),
  );
}

async function usageView() {
  if (session.admin && !session.tenant) return el("p", {}, "Pick a tenant above to see its usage.");
  const path = session.admin ? `/admin/usage?tenant=${enc(session.tenant)}` : "/v1/usage";
  const report = await api("GET", path);
  const { totals } = report;
  const rows = report.data.map((l) => [l.day, l.adapter || "(base)", String(l.version), String(l.requests),
    String(l.prompt_tokens), String(l.completion_tokens), String(l.errors)]);
  return [
    el("h2", { tabindex: -1 }, "Usage"),
    el("p", {}, `${report.since} to ${report.until}: ${totals.requests} requests, ` +
      `${totals.prompt_tokens + totals.completion_tokens} tokens, ${totals.errors} errors.`),
    section("Over time", ...usageCharts(report)),
    section("By day and adapter", table("Usage", ["Day", "Adapter", "Version", "Requests", "Prompt tokens",
      "Completion tokens", "Errors"], rows)),
  ];
}

/** Requests a day per adapter version (a canary's share shows), and tokens a day in all. */
function usageCharts(report) {
  // x is days since the report's first day, so days without traffic keep their place.
  const start = Date.parse(report.since);
  const dayOf = (line) => Math.round((Date.parse(line.day) - start) / 86_400_000);
  const label = (x) => new Date(start + x * 86_400_000).toISOString().slice(5, 10);
  const byVersion = new Map();
  const tokens = new Map();
  for (const line of report.data) {
    const name = line.adapter ? `${line.adapter} v${line.version}` : "base model";
    if (!byVersion.has(name)) byVersion.set(name, { name, points: [] });
    byVersion.get(name).points.push([dayOf(line), line.requests]);
    const used = line.prompt_tokens + line.completion_tokens;
    tokens.set(dayOf(line), (tokens.get(dayOf(line)) || 0) + used);
  }
  const tokenPoints = [...tokens.entries()].sort((a, b) => a[0] - b[0]);
  return [
    lineChart({ title: "Requests per day by adapter version", xLabel: label, series: [...byVersion.values()] }),
    lineChart({ title: "Tokens per day", xLabel: label, series: [{ name: "tokens", points: tokenPoints }] }),
  ];
}

async function auditView() {
  if (session.admin) {
    const tenant = session.tenant ? `&tenant=${enc(session.tenant)}` : "";
    const { data } = await api("GET", `/admin/audit?limit=200${tenant}`);
    const rows = data.reverse().map((e) => [iso(e.created_at), e.actor, e.action, e.subject]);
    return [el("h2", { tabindex: -1 }, "Audit log"), table("Audit log, newest first", ["Time", "Actor", "Action", "Subject"], rows)];
  }
  // A tenant reads its audit log through the lifecycle event log, which pages forward
  // from a cursor: read to the end, show the newest.
  let events = [];
  for (let after = 0, more = true, pages = 0; more && pages < 20; pages += 1) {
    const page = await api("GET", `/v1/events?after=${after}&limit=1000`);
    events = events.concat(page.data);
    [after, more] = [page.last_id, page.has_more];
  }
  const rows = events.slice(-200).reverse().map((e) => [
    when(e.created_at), e.data.actor ?? "", e.type, e.data.subject ?? "",
  ]);
  return [el("h2", { tabindex: -1 }, "Audit log"), table("Audit log, newest first", ["Time", "Actor", "Event", "Subject"], rows)];
}

// -- routing, sign-in ---------------------------------------------------------------

const VIEWS = [
  [/^#\/adapters\/(.+)$/, (m) => adapterView(decodeURIComponent(m[1]))],
  [/^#\/jobs\/(.+)$/, (m) => jobView(decodeURIComponent(m[1]))],
  [/^#\/jobs$/, jobsView],
  [/^#\/loops$/, loopsView],
  [/^#\/upgrades$/, upgradesView],
  [/^#\/usage$/, usageView],
  [/^#\/audit$/, auditView],
  [/^/, adaptersView],
];

async function render() {
  const view = $("#view");
  if (!session.key) return;
  const hash = location.hash || "#/adapters";
  const [pattern, build] = VIEWS.find(([p]) => p.test(hash));
  let content;
  try {
    content = await build(hash.match(pattern));
  } catch (error) {
    content = el("p", { role: "alert", class: "problem" }, error.message);
  }
  view.replaceChildren(...[content].flat());
  markCurrent(hash);
  // Move focus to the new view's heading, so keyboard and screen-reader users start there.
  view.querySelector("h2")?.focus();
}

function markCurrent(hash) {
  for (const link of document.querySelectorAll("#nav a")) {
    const here = hash.startsWith(link.getAttribute("href"));
    if (here) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

async function signIn(key) {
  session.key = key;
  try {
    await api("GET", "/v1/adapters");
    session.admin = false;
  } catch (error) {
    if (error.code !== "tenant_key_required") throw error;
    session.admin = true; // tenant routes refuse admin keys: it is one
  }
  sessionStorage.setItem(KEY, key);
  await showSignedIn();
}

async function tenantPicker() {
  const { data } = await api("GET", "/admin/tenants");
  const pick = el("select", { id: "tenant", onchange: (e) => {
    session.tenant = e.target.value;
    sessionStorage.setItem(TENANT, session.tenant);
    render();
  } }, el("option", { value: "" }, "(choose)"),
  data.map((t) => el("option", { value: t.name, selected: t.name === session.tenant }, t.name)));
  return [el("label", { for: "tenant" }, "Tenant"), pick];
}

async function showSignedIn() {
  $("#sign-in").hidden = true;
  $("#nav").hidden = false;
  $("#who").hidden = false;
  const who = $("#who-text");
  who.replaceChildren(session.admin ? "Admin key" : "Tenant key");
  if (session.admin) who.append(" ", ...(await tenantPicker()));
  await render();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(TENANT);
  Object.assign(session, { key: null, admin: false, tenant: null });
  $("#view").replaceChildren();
  $("#nav").hidden = true;
  $("#who").hidden = true;
  $("#sign-in").hidden = false;
  $("#api-key").focus();
}

async function start() {
  $("#sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("#api-key");
    try {
      await signIn(input.value.trim());
      input.value = "";
    } catch (error) {
      session.key = null;
      say(`Sign-in failed: ${error.message}`);
    }
  });
  $("#sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", render);
  session.tenant = sessionStorage.getItem(TENANT);
  const key = sessionStorage.getItem(KEY);
  if (key) {
    try {
      return await signIn(key);
    } catch {
      sessionStorage.removeItem(KEY); // revoked since: ask again
    }
  }
  signOut();
}

start();
