{{- define "hyperbox.labels" -}}
app.kubernetes.io/name: hyperbox
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "hyperbox.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "hyperbox.operatorName" -}}
{{ .Release.Name }}-operator
{{- end -}}

{{- define "hyperbox.nodeName" -}}
{{ .Release.Name }}-node
{{- end -}}
