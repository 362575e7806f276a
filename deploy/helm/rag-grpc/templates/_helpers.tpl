{{/* Names: <release>-rag-grpc unless the release already says rag-grpc. */}}
{{- define "rag-grpc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rag-grpc.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rag-grpc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "rag-grpc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rag-grpc
{{- end -}}

{{/* Selector labels of one component: include with (list $ "retrieval"). */}}
{{- define "rag-grpc.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "rag-grpc.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "rag-grpc.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "rag-grpc.retrievalHeadless" -}}
{{- printf "%s-retrieval-headless" (include "rag-grpc.fullname" .) -}}
{{- end -}}

{{/* The DNS name Envoy resolves to every replica (and their certificate's name). */}}
{{- define "rag-grpc.retrievalHost" -}}
{{- printf "%s.%s.svc.%s" (include "rag-grpc.retrievalHeadless" .) .Release.Namespace .Values.clusterDomain -}}
{{- end -}}

{{- define "rag-grpc.natsHeadless" -}}
{{- printf "%s-nats-headless" (include "rag-grpc.fullname" .) -}}
{{- end -}}

{{- define "rag-grpc.natsEnabled" -}}
{{- if or .Values.nats.enabled .Values.nats.externalUrl -}}true{{- end -}}
{{- end -}}

{{/* ingestion.nats_url: every node of our cluster, or the external URL. */}}
{{- define "rag-grpc.natsUrl" -}}
{{- if .Values.nats.externalUrl -}}
{{- .Values.nats.externalUrl -}}
{{- else -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.nats.replicas) -}}
{{- $urls = append $urls (printf "nats://%s-nats-%d.%s.%s.svc.%s:4222" (include "rag-grpc.fullname" $) $i (include "rag-grpc.natsHeadless" $) $.Release.Namespace $.Values.clusterDomain) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}
{{- end -}}

{{- define "rag-grpc.authSecret" -}}
{{- default (printf "%s-auth" (include "rag-grpc.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "rag-grpc.natsPrefix" -}}
{{- $ingestion := default dict .Values.config.ingestion -}}
{{- default "RAG" $ingestion.nats_prefix -}}
{{- end -}}

{{/*
The environment of a rag-grpc container (retrieval replica or worker); the
role-specific variables are added by each template. Secrets are files, copied
owner-only by the init container (rag-grpc refuses group-readable ones, and
fsGroup makes Secret volumes group-readable).
*/}}
{{- define "rag-grpc.env" -}}
- name: RAG_GRPC_CONFIG
  value: /etc/rag-grpc/config.toml
# The root filesystem is read-only: anything that caches under $HOME writes to /tmp.
- name: HOME
  value: /tmp
- name: RAG_GRPC_HOST
  value: "0.0.0.0"
- name: RAG_GRPC_PORT
  value: {{ .Values.grpcPort | quote }}
- name: RAG_GRPC_DATA_DIR
  value: /var/lib/rag-grpc
- name: RAG_GRPC_TELEMETRY__PROMETHEUS_PORT
  value: {{ .Values.metricsPort | quote }}
{{- if include "rag-grpc.natsEnabled" . }}
- name: RAG_GRPC_INGESTION__QUEUE
  value: nats
- name: RAG_GRPC_INGESTION__NATS_URL
  value: {{ include "rag-grpc.natsUrl" . | quote }}
- name: RAG_GRPC_INGESTION__NATS_REPLICAS
  value: {{ .Values.nats.streamReplicas | quote }}
{{- end }}
{{- if .Values.auth.insecureNoAuth }}
- name: RAG_GRPC_AUTH__INSECURE_NO_AUTH
  value: "true"
{{- else }}
- name: RAG_GRPC_SERVER__AUTH_TOKEN_FILE
  value: /run/rag-grpc/secrets/token
{{- end }}
{{- if .Values.backup.keySecret }}
- name: RAG_GRPC_BACKUP_KEY_FILE
  value: /run/rag-grpc/secrets/backup.key
{{- end }}
{{- if .Values.auth.policySecret }}
- name: RAG_GRPC_AUTH__POLICY_FILE
  value: /run/rag-grpc/secrets/policy.toml
{{- end }}
{{- if .Values.tls.enabled }}
- name: RAG_GRPC_SERVER__TLS_CERT
  value: /run/rag-grpc/tls/tls.crt
- name: RAG_GRPC_SERVER__TLS_KEY
  value: /run/rag-grpc/tls/tls.key
- name: RAG_GRPC_SERVER__TLS_CLIENT_CA
  value: /run/rag-grpc/tls/ca.crt
{{- end }}
{{- if .Values.triton.enabled }}
- name: RAG_GRPC_GENERATION__GENERATOR
  value: triton
- name: RAG_GRPC_GENERATION__TRITON__URL
  value: {{ printf "%s-triton:8001" (include "rag-grpc.fullname" .) | quote }}
- name: RAG_GRPC_GENERATION__TRITON__MODEL
  value: {{ .Values.triton.model | quote }}
{{- end }}
{{- end -}}

{{/* Copies the mounted Secrets owner-only (0400) into a memory volume. */}}
{{- define "rag-grpc.secretsInit" -}}
- name: secrets
  image: {{ include "rag-grpc.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["sh", "-c", "for f in /secrets/*/*; do install -m 0400 \"$f\" /run/rag-grpc/secrets/; done"]
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 64Mi}
  volumeMounts:
    - name: run-secrets
      mountPath: /run/rag-grpc/secrets
    {{- if not .Values.auth.insecureNoAuth }}
    - name: auth-token
      mountPath: /secrets/auth
      readOnly: true
    {{- end }}
    {{- if .Values.backup.keySecret }}
    - name: backup-key
      mountPath: /secrets/backup
      readOnly: true
    {{- end }}
    {{- if .Values.auth.policySecret }}
    - name: policy
      mountPath: /secrets/policy
      readOnly: true
    {{- end }}
{{- end -}}

{{- define "rag-grpc.secretVolumes" -}}
- name: run-secrets
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- if not .Values.auth.insecureNoAuth }}
- name: auth-token
  secret:
    secretName: {{ include "rag-grpc.authSecret" . }}
    defaultMode: 0400
    items:
      - key: {{ .Values.auth.key }}
        path: token
{{- end }}
{{- if .Values.backup.keySecret }}
- name: backup-key
  secret:
    secretName: {{ .Values.backup.keySecret }}
    defaultMode: 0400
    items:
      - key: backup.key
        path: backup.key
{{- end }}
{{- if .Values.auth.policySecret }}
- name: policy
  secret:
    secretName: {{ .Values.auth.policySecret }}
    defaultMode: 0400
    items:
      - key: policy.toml
        path: policy.toml
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ required "tls.serverSecret is required with tls.enabled" .Values.tls.serverSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{- define "rag-grpc.mounts" -}}
- name: config
  mountPath: /etc/rag-grpc
  readOnly: true
- name: run-secrets
  mountPath: /run/rag-grpc/secrets
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /run/rag-grpc/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/*
Health probes of a rag-grpc container for one gRPC health service name:
native gRPC probes. Kubelet's gRPC probe speaks plaintext only, so with
tls.enabled the probe runs grpc.health.v1 over mutual TLS from inside the pod
with the pod's own certificate instead.
*/}}
{{- define "rag-grpc.probe" -}}
{{- $root := index . 0 -}}
{{- $service := index . 1 -}}
{{- if $root.Values.tls.enabled -}}
exec:
  command:
    - python3
    - -c
    - |
      import sys, grpc
      from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
      r = lambda n: open("/run/rag-grpc/tls/" + n, "rb").read()
      creds = grpc.ssl_channel_credentials(r("ca.crt"), r("tls.key"), r("tls.crt"))
      ch = grpc.secure_channel("127.0.0.1:{{ $root.Values.grpcPort }}", creds, options=[("grpc.ssl_target_name_override", "{{ include "rag-grpc.retrievalHost" $root }}")])
      s = g.HealthStub(ch).Check(h.HealthCheckRequest(service="{{ $service }}"), timeout=4).status
      sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)
{{- else -}}
grpc:
  port: {{ $root.Values.grpcPort }}
  service: {{ $service | quote }}
{{- end -}}
{{- end -}}
