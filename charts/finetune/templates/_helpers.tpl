{{- define "finetune.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "finetune.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
The finetuning config: .Values.finetuning, with each section that comes in kinds taken from
.Values.finetuningDefaults only where the user's config has none (so kinds never mix).
*/}}
{{- define "finetune.config" -}}
{{- $config := deepCopy .Values.finetuning -}}
{{- $defaults := .Values.finetuningDefaults | default dict -}}
{{- $data := get $config "data_conf" | default dict -}}
{{- if and (hasKey $defaults "validation_data") (not (hasKey $data "validation_data")) -}}
{{- $_ := set $data "validation_data" (deepCopy $defaults.validation_data) -}}
{{- end -}}
{{- $_ := set $config "data_conf" $data -}}
{{- range $section := list "peft_conf" "quant_conf" -}}
{{- if and (hasKey $defaults $section) (not (hasKey $config $section)) -}}
{{- $_ := set $config $section (deepCopy (get $defaults $section)) -}}
{{- end -}}
{{- end -}}
{{- with .Values.ray }}{{- if .address -}}
{{- $experiment := get $config "experiment" | default dict -}}
{{- $_ := set $experiment "backend" "ray" -}}
{{- $_ := set $experiment "ray_address" .address -}}
{{- $_ := set $config "experiment" $experiment -}}
{{- end }}{{- end -}}
{{- toYaml $config -}}
{{- end -}}
