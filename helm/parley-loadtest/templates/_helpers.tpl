{{/* <release>-loadtest, or the release name alone when it already says so ("loadtest" -> loadtest-master). */}}
{{- define "parley-loadtest.fullname" -}}
{{- if contains "loadtest" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-loadtest" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "worker"). */}}
{{- define "parley-loadtest.selectorLabels" -}}
app.kubernetes.io/name: parley-loadtest
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "parley-loadtest.labels" -}}
{{ include "parley-loadtest.selectorLabels" . }}
app.kubernetes.io/part-of: parley
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "parley-loadtest.image" -}}
{{- $i := .Values.image -}}
{{- if $i.digest -}}{{ printf "%s@%s" $i.repository $i.digest }}{{- else -}}{{ printf "%s:%s" $i.repository ($i.tag | default .Chart.AppVersion) }}{{- end -}}
{{- end -}}

{{- define "parley-loadtest.mintImage" -}}
{{- $i := .Values.mint.image -}}
{{- if $i.digest -}}{{ printf "%s@%s" $i.repository $i.digest }}{{- else -}}{{ printf "%s:%s" $i.repository ($i.tag | default .Chart.AppVersion) }}{{- end -}}
{{- end -}}

{{- define "parley-loadtest.masterService" -}}
{{- printf "%s-master" (include "parley-loadtest.fullname" .) -}}
{{- end -}}

{{- define "parley-loadtest.platformName" -}}
{{- .Values.platform.name | default .Values.platform.release -}}
{{- end -}}

{{- define "parley-loadtest.platformNamespace" -}}
{{- .Values.platform.namespace | default .Release.Namespace -}}
{{- end -}}

{{/* The platform's protocol Service (port 80), unless locust.host names another URL. */}}
{{- define "parley-loadtest.host" -}}
{{- .Values.locust.host | default (printf "http://%s-protocol.%s.svc.%s" (include "parley-loadtest.platformName" .) (include "parley-loadtest.platformNamespace" .) .Values.platform.clusterDomain) -}}
{{- end -}}

{{- define "parley-loadtest.claimName" -}}
{{- .Values.usersFile.persistence.existingClaim | default (printf "%s-users" (include "parley-loadtest.fullname" .)) -}}
{{- end -}}

{{- define "parley-loadtest.usersPath" -}}
{{- printf "/users/%s" .Values.usersFile.fileName -}}
{{- end -}}

{{/* Users one worker process runs: Locust spreads the target evenly over the workers. */}}
{{- define "parley-loadtest.usersPerWorker" -}}
{{- $replicas := int .Values.workers.replicas -}}
{{- div (add (int .Values.locust.targetUsers) (sub $replicas 1)) $replicas -}}
{{- end -}}

{{- define "parley-loadtest.openFilesNeeded" -}}
{{- add (mul (int (include "parley-loadtest.usersPerWorker" .)) (int .Values.workers.openFilesPerUser)) (int .Values.workers.openFilesReserve) -}}
{{- end -}}

{{/* Requests from the measured cost per 1,000 users (values.yaml, workers.cost), unless given. */}}
{{- define "parley-loadtest.workerResources" -}}
{{- if .Values.workers.resources -}}
{{- toYaml .Values.workers.resources -}}
{{- else -}}
{{- $cost := .Values.workers.cost -}}
{{- $users := float64 (include "parley-loadtest.usersPerWorker" .) -}}
{{- $cpu := mulf $users (float64 $cost.cpuPer1000Users) | ceil | int -}}
{{- $memory := addf (float64 $cost.baseMemoryMi) (mulf (divf $users 1000.0) (float64 $cost.memoryMiPer1000Users)) | ceil | int -}}
requests:
  cpu: {{ printf "%dm" $cpu }}
  memory: {{ printf "%dMi" $memory }}
limits:
  memory: {{ printf "%dMi" (mulf (float64 $memory) (float64 .Values.workers.memoryLimitRatio) | ceil | int) }}
{{- end -}}
{{- end -}}

{{/* Render-time checks: each refuses a run that would measure the load client's limits, or the
     platform's abuse throttle, instead of the platform's capacity. */}}
{{- define "parley-loadtest.checks" -}}
{{- $workers := int .Values.workers.replicas -}}
{{- $perWorker := divf (float64 .Values.locust.rampRate) (float64 $workers) -}}
{{- /* Locust's master warns when one worker is told to spawn more than 100 users/s (runners.py). */ -}}
{{- if gt $perWorker 100.0 -}}
{{- fail (printf "locust.rampRate %v users/s over %d workers is %.1f spawns/s per worker, above the 100 per worker where Locust warns that spawning becomes unreliable. Add workers (workers.replicas >= %d) or lower locust.rampRate" .Values.locust.rampRate $workers $perWorker (divf (float64 .Values.locust.rampRate) 100.0 | ceil | int)) -}}
{{- end -}}
{{- /* The platform throttles WebSocket handshakes per client address in each protocol process
     (chat/throttle.py); one worker pod is one address, its connections spread over the pods. */ -}}
{{- $pods := int .Values.platform.protocolPods -}}
{{- $perPod := divf $perWorker (float64 $pods) -}}
{{- if and (not .Values.platform.exemptsLoad) (gt $perPod (float64 .Values.platform.handshakesPerSecond)) -}}
{{- fail (printf "locust.rampRate %v users/s over %d workers and %d protocol pods is %.1f handshakes/s from one worker's address to one protocol process, above the platform's limit of %v per address (PARLEY_HANDSHAKES_PER_SECOND; beyond its burst the platform refuses sockets with 4029 rate_limited). Add workers, lower locust.rampRate, start the platform with more protocol pods (platform.protocolPods is its protocol.minReplicas), or exempt the load pods on the platform (its handshakeLimit.exempt) and set platform.exemptsLoad=true" .Values.locust.rampRate $workers $pods $perPod .Values.platform.handshakesPerSecond) -}}
{{- end -}}
{{- $users := int (include "parley-loadtest.usersPerWorker" .) -}}
{{- /* Linux's default ip_local_port_range (32768-60999) gives one pod 28,232 source ports towards
     one destination address and port (the protocol Service). */ -}}
{{- if and (gt $users 28232) (not .Values.workers.sysctls) -}}
{{- fail (printf "%d users per worker exceed the 28,232 ephemeral ports one pod has towards one destination: add workers (workers.replicas) or widen net.ipv4.ip_local_port_range (workers.sysctls)" $users) -}}
{{- end -}}
{{- if not .Values.workers.resources -}}
{{- if or (kindIs "invalid" .Values.workers.cost.cpuPer1000Users) (kindIs "invalid" .Values.workers.cost.memoryMiPer1000Users) -}}
{{- fail "workers.cost.cpuPer1000Users and workers.cost.memoryMiPer1000Users are placeholders until measured (docs/loadtest.json, \"locust\"): set both, or give workers.resources" -}}
{{- end -}}
{{- /* One Locust process runs on one core; Locust itself warns above 90 % CPU, where its timings
     stop being the platform's. */ -}}
{{- $cpu := mulf (float64 $users) (float64 .Values.workers.cost.cpuPer1000Users) | ceil | int -}}
{{- if gt $cpu 900 -}}
{{- fail (printf "%d users per worker need %dm CPU at the measured cost, but one Locust process uses one core and is unreliable above 90 %%: add workers (workers.replicas)" $users $cpu) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.mint.enabled (not .Values.usersFile.enabled) -}}
{{- fail "mint.enabled needs usersFile.enabled (the mint writes the users file into its volume)" -}}
{{- end -}}
{{- end -}}

{{/* The platform-specific options of loadtest/locustfile.py, for the master and every worker. */}}
{{- define "parley-loadtest.locustArgs" -}}
{{- $l := .Values.locust -}}
- -f
- {{ $l.locustfile | quote }}
{{- if .Values.usersFile.enabled }}
- --token-file
- {{ include "parley-loadtest.usersPath" . | quote }}
{{- end }}
- --target-users
- {{ $l.targetUsers | quote }}
- --ramp-rate
- {{ $l.rampRate | quote }}
- --hold-seconds
- {{ $l.holdSeconds | quote }}
{{- with $l.mix }}
- --mix
- {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" $l.messageRate) }}
- --message-rate
- {{ $l.messageRate | quote }}
{{- end }}
{{- if not (kindIs "invalid" $l.minConnectSuccess) }}
- --min-connect-success
- {{ $l.minConnectSuccess | quote }}
{{- end }}
{{- if not (kindIs "invalid" $l.maxDeliveryP99Ms) }}
- --max-delivery-p99-ms
- {{ $l.maxDeliveryP99Ms | quote }}
{{- end }}
{{- range $l.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Kubernetes has no per-pod ulimit: the container runtime sets the open-files limits (its
     systemd unit's LimitNOFILE, CRI-O's default_ulimits) and the process may raise its soft limit
     up to the hard one. Locust itself raises the soft limit only to 10,000. */}}
{{- define "parley-loadtest.raiseOpenFiles" -}}
need={{ .need }}
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ]; then soft="$need"; else soft="$hard"; fi
if [ "$hard" != unlimited ] && [ "$hard" -lt "$need" ]; then
  echo "parley-loadtest: the open-files hard limit is $hard, below the $need this pod needs ({{ .why }}). Raise the container runtime's limit (containerd: LimitNOFILE in its systemd unit; CRI-O: default_ulimits) or run fewer users per worker (more workers.replicas)." >&2
  exit 1
fi
ulimit -n "$soft"
echo "parley-loadtest: open files: soft $(ulimit -Sn), hard $hard, needed $need"
{{- end -}}

{{/* Waits (bounded) for the mint's file and checks its header before Locust reads it. */}}
{{- define "parley-loadtest.waitForUsers" -}}
- name: wait-for-users
  image: {{ include "parley-loadtest.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [sh, -c]
  args:
    - |
      file={{ include "parley-loadtest.usersPath" . }}
      deadline=$(( $(date +%s) + {{ int .Values.usersFile.waitSeconds }} ))
      until [ -e "$file" ]; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
          echo "parley-loadtest: no $file after {{ int .Values.usersFile.waitSeconds }} s.{{ if .Values.mint.enabled }} Is the mint Job done? kubectl -n {{ .Release.Namespace }} logs -l app.kubernetes.io/instance={{ .Release.Name }},app.kubernetes.io/component=mint{{ else }} Put the users file into the volume {{ include "parley-loadtest.claimName" . }}{{ end }}" >&2
          exit 1
        fi
        sleep 5
      done
      exec python -c "$CHECK" "$file" {{ int .Values.locust.targetUsers }}
  env:
    # The header, read without the locustfile's imports: the file is the mint's format, readable
    # by this uid (mode 0600), and holds a user for every Locust user.
    - name: CHECK
      value: |
        import json, sys
        path, want = sys.argv[1], int(sys.argv[2])
        try:
            with open(path, encoding="utf-8") as f:
                header = json.loads(f.readline())
        except PermissionError:
            sys.exit(f"parley-loadtest: cannot read {path}: it is mode 0600; the mint and the Locust pods must run as the same uid (podSecurityContext.runAsUser)")
        except ValueError as exc:
            sys.exit(f"parley-loadtest: {path} line 1 is not a users-file header: {exc}")
        if header.get("format") != "parley-loadtest-users" or header.get("version") != 1:
            sys.exit(f"parley-loadtest: {path} is not a parley-loadtest-users file, version 1: {str(header)[:200]}")
        if int(header.get("count", 0)) < want:
            sys.exit(f"parley-loadtest: {path} holds {header.get('count')} users, fewer than locust.targetUsers={want}: mint more (mint.count)")
        print(f"parley-loadtest: {path}: {header['count']} users, prefix {header.get('prefix')!r}, minted {header.get('created_at')}")
  resources:
    requests: {cpu: 10m, memory: 32Mi}
    limits: {memory: 64Mi}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    - {name: users, mountPath: /users, readOnly: true}
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* Pod-level pieces of every pod of the release: (dict "root" $ "sysctls" list). */}}
{{- define "parley-loadtest.podSecurity" -}}
{{- $context := deepCopy .root.Values.podSecurityContext -}}
{{- with .sysctls }}{{ $_ := set $context "sysctls" . }}{{ end -}}
securityContext:
  {{- toYaml $context | nindent 2 }}
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
# Locust and the mint never talk to the API server.
automountServiceAccountToken: false
{{- end -}}

{{/* Runs Locust as a child of the shell (PID 1) and, when the run ends by itself, does not end
     the container: the Deployment would restart it into a second run (master) or into a crash
     loop of workers looking for a master that has finished. It holds instead, so the reports and
     logs stay readable, until the release is uninstalled.
     Signals reach Locust as SIGINT, its Ctrl-C: SIGTERM (the pod is deleted) and SIGINT
     (`kubectl exec ... -- kill -INT 1`: stop the run early and keep its reports). In a headless run
     with a LoadTestShape, Locust installs its SIGTERM handler only after the shape has ended, so a
     SIGTERM would kill it without its final stats, verdict or reports. A background job of a
     non-interactive shell starts with SIGINT ignored: env restores it.
     (dict "need" N "why" "..." "master" bool) */}}
{{- define "parley-loadtest.runLocust" -}}
{{ include "parley-loadtest.raiseOpenFiles" . }}
term=0; pid=""
trap 'term=1; [ -z "$pid" ] || kill -INT "$pid" 2>/dev/null' TERM
trap '[ -z "$pid" ] || kill -INT "$pid" 2>/dev/null' INT
env --default-signal=INT locust "$@" &
pid=$!
rc=0; wait "$pid" || rc=$?
while kill -0 "$pid" 2>/dev/null; do rc=0; wait "$pid" || rc=$?; done
{{- if .master }}
echo "$rc" > /reports/exit-code
{{- end }}
[ "$term" = 1 ] && exit "$rc"
{{- if .master }}
echo "parley-loadtest: the run ended with exit code $rc (0: every threshold passed). Reports in /reports; holding until the release is uninstalled."
{{- else }}
# A worker ends with 0 when the master tells it the run is over; anything else is a crash,
# which the Deployment restarts.
[ "$rc" = 0 ] || exit "$rc"
echo "parley-loadtest: the master ended the run; holding until the release is uninstalled."
{{- end }}
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
{{- end -}}

{{/* Whether to add the policy that admits the load to one of the platform's tiers: (dict "root" $ "policy" NAME). */}}
{{- define "parley-loadtest.admit" -}}
{{- $mode := .root.Values.networkPolicy.admitToPlatform -}}
{{- if eq (toString $mode) "auto" -}}
{{- if lookup "networking.k8s.io/v1" "NetworkPolicy" (include "parley-loadtest.platformNamespace" .root) .policy -}}true{{- end -}}
{{- else if $mode -}}true{{- end -}}
{{- end -}}
