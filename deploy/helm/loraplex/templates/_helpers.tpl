{{/*
The chart name (app.kubernetes.io/name of every loraplex pod).
*/}}
{{- define "loraplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Every object's name prefix: `helm install loraplex` gives "loraplex", the kustomize names.
*/}}
{{- define "loraplex.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "loraplex.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Labels on every object's metadata: kustomize's part-of, and Helm's own.
*/}}
{{- define "loraplex.commonLabels" -}}
app.kubernetes.io/part-of: loraplex
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
What selects one component's pods (dict "root" $ "component" "gateway" ["base" NAME]).
No release label: the selectors match the kustomize manifests', so either can take over.
*/}}
{{- define "loraplex.selector" -}}
app.kubernetes.io/name: {{ include "loraplex.name" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with .base }}
loraplex.dev/base: {{ . }}
{{- end }}
{{- end -}}

{{/*
An object's metadata labels: the common ones and its component's selector labels.
*/}}
{{- define "loraplex.labels" -}}
{{ include "loraplex.commonLabels" .root }}
{{ include "loraplex.selector" . }}
{{- end -}}

{{/*
The image every container runs.
*/}}
{{- define "loraplex.image" -}}
image: {{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) | quote }}
{{- with .Values.image.pullPolicy }}
imagePullPolicy: {{ . }}
{{- end }}
{{- end -}}

{{/*
The pod-level security context of every pod.
*/}}
{{- define "loraplex.podSecurityContext" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: {{ .Values.podUser }}
  runAsGroup: {{ .Values.podUser }}
  fsGroup: {{ .Values.podUser }}
{{- end -}}

{{/*
Every container's security context: read-only root, no privilege escalation, no capability.
*/}}
{{- define "loraplex.containerSecurityContext" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{/*
Restarts pods when the settings they read change (kustomize needs a rollout restart).
*/}}
{{- define "loraplex.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/config.yaml") . | sha256sum }}
{{- end -}}

{{/*
The environment every role reads: the shared settings and the S3 credentials.
*/}}
{{- define "loraplex.envFrom" -}}
- configMapRef:
    name: {{ include "loraplex.fullname" .root }}-config
{{- with .base }}
- configMapRef:
    name: {{ include "loraplex.fullname" $.root }}-base-model{{ .suffix }}
{{- end }}
- secretRef:
    name: {{ include "loraplex.fullname" .root }}-s3
{{- end -}}

{{/*
One variable from one of the chart's Secrets (dict "root" $ "env" NAME "secret" SUFFIX "key" KEY).
*/}}
{{- define "loraplex.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "loraplex.fullname" .root }}-{{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/*
The `bases` list with each entry merged over baseDefaults, checked: names, suffixes and
served names unique (two bases sharing one would share objects or confuse the gateways).
*/}}
{{- define "loraplex.bases" -}}
{{- $bases := list -}}
{{- $seen := dict -}}
{{- if not .Values.bases -}}
{{- fail "bases: at least one base model is needed" -}}
{{- end -}}
{{- range .Values.bases -}}
{{- if or (not .name) (not .servedModelName) -}}
{{- fail "bases: every entry needs a name and a servedModelName" -}}
{{- end -}}
{{- $base := mergeOverwrite (deepCopy $.Values.baseDefaults) (deepCopy .) -}}
{{- $_ := set $base "suffix" (ternary .suffix (printf "-%s" .name) (hasKey . "suffix")) -}}
{{- range $what, $value := dict "name" $base.name "suffix" $base.suffix "servedModelName" $base.servedModelName -}}
{{- $mark := printf "%s=%s" $what $value -}}
{{- if hasKey $seen $mark -}}
{{- fail (printf "bases: two bases share %s %q" $what $value) -}}
{{- end -}}
{{- $_ := set $seen $mark true -}}
{{- end -}}
{{- $bases = append $bases $base -}}
{{- end -}}
{{- toJson (dict "bases" $bases) -}}
{{- end -}}
