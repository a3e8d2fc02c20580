"""A fine-tuning job's checkpoint served by the real gateway and engine, through the
official ``openai`` client: the checkpoint list names ``adapter@N`` versions, and a chat
completion on one of them answers as that version.

The job asks for servable checkpoints (``extra_body``) and trains in process (a worker
on the gateway's own registry), one epoch of a tiny dataset, so the session's gateway and
engine serve the result.
"""

from __future__ import annotations

import io
from pathlib import Path

from openai import OpenAI

from registry import Registry
from registry.jobs import JobStore
from tests.e2e.conftest import make_tenant
from tests.e2e.serving import ServeProcess
from tests.training.training_testdata import fixed_answer_records, jsonl
from training.config import TrainConfig
from training.worker import Worker, WorkerOptions


def test_a_checkpoint_is_served_by_its_name(
    gateway: ServeProcess, registry: Registry, demo_base: Path, base_name: str, tmp_path: Path
) -> None:
    tenant = make_tenant(registry, "checkpoints")
    client = OpenAI(base_url=gateway.url + "/v1", api_key=tenant.key, max_retries=0)
    files = [
        client.files.create(file=(name, io.BytesIO(jsonl(records))), purpose="fine-tune").id
        for name, records in (("t.jsonl", fixed_answer_records(12)),
                              ("v.jsonl", fixed_answer_records(4, "Cherry.")))
    ]  # fmt: skip
    job = client.fine_tuning.jobs.create(
        model=base_name,
        training_file=files[0],
        validation_file=files[1],
        suffix="ckpt-bot",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}},
        extra_body={"servable_checkpoints": True},
    )
    base = registry.find_base(base_name)
    assert base is not None
    # One epoch of small batches, evaluated every step: a few checkpoints, quickly.
    defaults = TrainConfig(learning_rate=1e-2, batch_size=2, eval_every=1, max_length=64)
    options = WorkerOptions(
        demo_base, base.fingerprint, tmp_path / "work", defaults, 0.1, 0.5,
        choose_hyperparameters=False,
    )  # fmt: skip
    assert Worker(JobStore(registry), options).run_once() is not None
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    names = [c.fine_tuned_model_checkpoint for c in checkpoints]
    served = [n for n in names if n.startswith("ckpt-bot@")]
    assert served, names
    oldest = served[-1]  # the newest may hold the result's weights; the oldest is its own
    answer = client.chat.completions.create(
        model=oldest, messages=[{"role": "user", "content": "hello"}], max_tokens=4
    )
    assert answer.model == oldest
    assert answer.choices[0].message.content is not None
