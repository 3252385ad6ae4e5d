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

{{/*
The GPUs the Job asks for: the most that one run of the config needs (experiment.devices_per_run,
a plain number, a $list knob, or set in groups), or .Values.gpus where that is more (more GPUs,
more runs at once).
*/}}
{{- define "finetune.gpus" -}}
{{- $most := int .Values.gpus -}}
{{- $experiments := list (get .Values.finetuning "experiment" | default dict) -}}
{{- range $group := (get .Values.finetuning "groups" | default list) -}}
{{- $experiments = append $experiments (get $group "experiment" | default dict) -}}
{{- end -}}
{{- range $experiment := $experiments -}}
{{- $perRun := get $experiment "devices_per_run" -}}
{{- $values := list -}}
{{- if kindIs "map" $perRun -}}
{{- $values = get $perRun "$list" | default list -}}
{{- else if $perRun -}}
{{- $values = list $perRun -}}
{{- end -}}
{{- range $value := $values -}}
{{- if gt (int $value) $most -}}{{- $most = int $value -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- $most -}}
{{- end -}}
