{{/* Chart name, truncated to a DNS label. */}}
{{- define "stadi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Object-name prefix: the release name, plus the chart name unless the release name holds it. */}}
{{- define "stadi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "stadi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "stadi.labels" -}}
helm.sh/chart: {{ include "stadi.chart" .ctx }}
{{ include "stadi.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: stadi
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "operator"). */}}
{{- define "stadi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stadi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "stadi.operator.fullname" -}}
{{- printf "%s-operator" (include "stadi.fullname" .) }}
{{- end }}

{{- define "stadi.agent.fullname" -}}
{{- printf "%s-agent" (include "stadi.fullname" .) }}
{{- end }}

{{- define "stadi.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "stadi.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stadi.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "stadi.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- required "agent.serviceAccount.name is required when agent.serviceAccount.create is false" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference; call with (dict "image" .Values.x.image "ctx" $). A digest wins over the tag. */}}
{{- define "stadi.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{- define "stadi.workerImage" -}}
{{- printf "%s:%s" .Values.operator.workerImage.repository (default .Chart.AppVersion .Values.operator.workerImage.tag) }}
{{- end }}

{{/* The worker images a job may name, comma-separated: the worker image's repository, then security.allowedImages
(the operator's STADI_OPERATOR_ALLOWED_IMAGES and the admission policy's parameter). */}}
{{- define "stadi.allowedImages" -}}
{{- prepend .Values.security.allowedImages .Values.operator.workerImage.repository | uniq | join "," }}
{{- end }}

{{/* The egress rules of every worker pod besides its gang, as JSON (STADI_OPERATOR_WORKER_EGRESS). */}}
{{- define "stadi.workerEgress" -}}
{{- $np := .Values.networkPolicy }}
{{- if not $np.apiServer }}
{{- fail "networkPolicy.apiServer: give the egress rules to the API server (its endpoint addresses and port) when networkPolicy.enabled is true" }}
{{- end }}
{{- concat $np.dns $np.apiServer $np.storage | toJson }}
{{- end }}

{{/*
The operator's rights on DiffusionJobs and their children, exactly the API calls it makes (controller/, kube.py,
kopf): one set of rules, bound cluster-wide (all namespaces) or per watched namespace.
*/}}
{{- define "stadi.operator.jobRules" -}}
# kopf watches the jobs, keeps its progress in annotations (patch) and writes the status (patch of the
# subresource); ttlSecondsAfterFinished deletes a finished job.
- apiGroups: ["stadi.dev"]
  resources: ["diffusionjobs"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# patch: kopf's status writes. It is also what the per-job worker Role grants, and RBAC lets the operator
# create that Role only because it holds the right itself (escalation prevention).
- apiGroups: ["stadi.dev"]
  resources: ["diffusionjobs/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: clusters running the
# OwnerReferencesPermissionEnforcement admission plugin require this.
- apiGroups: ["stadi.dev"]
  resources: ["diffusionjobs/finalizers"]
  verbs: ["update"]
# Worker pods: created per attempt, listed and watched (inventory index, reconcile), deleted on retry,
# patched only to adopt an orphan (ownerReferences).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Per-job children: created once, read back (idempotent create), patched to sync or adopt.
- apiGroups: [""]
  resources: ["configmaps", "services", "serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The job's Namespace, for its stadi.dev/job-secrets annotation (the Secrets its jobs may use): the operator never
# reads a Secret. In a namespace's Role this grants exactly that namespace.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["get"]
{{- if .Values.networkPolicy.enabled }}
# The per-job NetworkPolicy of the worker pods: created once, read back, patched to sync or adopt.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch"]
{{- end }}
# The claim template of a worker pod on a node whose GPUs DRA publishes (the resourceclaim controller makes the
# pod's claim from it): created once, read back, patched to sync or adopt.
- apiGroups: ["resource.k8s.io"]
  resources: ["resourceclaimtemplates"]
  verbs: ["get", "create", "patch"]
# Kueue: a queued job's Workload per attempt, created, read back for admission or eviction, deleted when the
# attempt ends (Kueue writes its status).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "create", "patch", "delete"]
{{- if ne .Values.operator.volcano "off" }}
- apiGroups: ["scheduling.volcano.sh"]
  resources: ["podgroups"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
{{- end }}
