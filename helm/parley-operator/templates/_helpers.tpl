{{- define "parley-operator.fullname" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley-operator.selectorLabels" -}}
app.kubernetes.io/name: parley-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "parley-operator.labels" -}}
{{ include "parley-operator.selectorLabels" . }}
app.kubernetes.io/part-of: parley
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "parley-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "parley-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "parley-operator.image" -}}
{{- $g := (.Values.global).image | default dict -}}
{{- $repo := .Values.image.repository | default $g.repository | default "parley" -}}
{{- $tag := .Values.image.tag | default $g.tag | default .Chart.AppVersion -}}
{{- $digest := .Values.image.digest | default $g.digest -}}
{{- if $digest -}}{{ printf "%s@%s" $repo $digest }}{{- else -}}{{ printf "%s:%s" $repo $tag }}{{- end -}}
{{- end -}}

{{/* The namespaces whose ChatPlatforms the operator handles (namespaced mode). */}}
{{- define "parley-operator.namespaces" -}}
{{- $list := list .Release.Namespace -}}
{{- range .Values.watchNamespaces }}{{ if not (has . $list) }}{{ $list = append $list . }}{{ end }}{{ end -}}
{{- join "," $list -}}
{{- end -}}

{{/*
The rules: exactly the verbs operator/parley_operator uses (docs/operations.md, "RBAC").
*/}}
{{- define "parley-operator.rules" -}}
# kopf lists and watches ChatPlatforms and patches them: its finalizer, its progress and
# last-handled-configuration annotations (parley.dev/...); the poller GETs the current status.
- apiGroups: [parley.dev]
  resources: [chatplatforms]
  verbs: [get, list, watch, patch]
# Status is written through the status subresource only.
- apiGroups: [parley.dev]
  resources: [chatplatforms/status]
  verbs: [get, patch]
# Children carry ownerReferences with blockOwnerDeletion=true (OwnerReferencesPermissionEnforcement).
- apiGroups: [parley.dev]
  resources: [chatplatforms/finalizers]
  verbs: [update]
# Children are read by name, created when missing, patched on drift or scaling; never listed
# or deleted (the garbage collector deletes them with the ChatPlatform).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, create, patch]
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch]
# pod-deletion-cost on protocol pods before a scale-down.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, patch]
# Only spec.redis.secretRef (the Redis URLs, to read queue depths); never the database Secret.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
  {{- with .Values.rbac.secretResourceNames }}
  resourceNames:
    {{- range . }}
    - {{ tpl . $ | quote }}
    {{- end }}
  {{- end }}
# Scaling decisions, drift reverts and metric outages are Events on the ChatPlatform.
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
