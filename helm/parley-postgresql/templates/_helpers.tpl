{{- define "parley-postgresql.fullname" -}}
{{- printf "%s-postgresql" .Release.Name | trunc 55 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley-postgresql.selectorLabels" -}}
app.kubernetes.io/name: parley-postgresql
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: postgresql
{{- end -}}

{{- define "parley-postgresql.labels" -}}
{{ include "parley-postgresql.selectorLabels" . }}
app.kubernetes.io/part-of: parley
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "parley-postgresql.secretName" -}}
{{- if .Values.auth.existingSecret -}}{{ tpl .Values.auth.existingSecret . }}{{- else -}}{{ include "parley-postgresql.fullname" . }}{{- end -}}
{{- end -}}

{{- define "parley-postgresql.image" -}}
{{- if .Values.image.digest -}}{{ printf "%s@%s" .Values.image.repository .Values.image.digest }}{{- else -}}{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}{{- end -}}
{{- end -}}
