#!/usr/bin/env bash
# Install the chart on a real kind or k3d cluster with values-small.yaml, wait for the platform,
# and run `helm test` (two WebSockets: send, ack, delivery). Needs docker, kind or k3d, kubectl
# and helm (`make helm-deps` puts helm and kubectl in var/tools/bin). Not run by `make test`.
#
#   tools/kind-smoke.sh                    # kind cluster "parley", image parley:dev built here
#   CLUSTER=k3d tools/kind-smoke.sh        # the same with k3d
#   KEEP=1 tools/kind-smoke.sh             # leave the cluster running afterwards
#   IMAGE=registry.example/parley:1.0 BUILD=0 tools/kind-smoke.sh   # a pushed image, no build
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/var/tools/bin:$PATH"
CLUSTER="${CLUSTER:-kind}"
NAME="${NAME:-parley}"
NS="${NS:-chat}"
RELEASE="${RELEASE:-chat}"
IMAGE="${IMAGE:-parley:dev}"
BUILD="${BUILD:-1}"
TIMEOUT="${TIMEOUT:-600}"

need() { command -v "$1" >/dev/null 2>&1 || { echo "kind-smoke: $1 is needed" >&2; exit 2; }; }
need helm; need kubectl; need "$CLUSTER"
[ "$BUILD" = 1 ] && need docker

cleanup() {
  status=$?
  if [ "$status" != 0 ]; then
    echo "--- kind-smoke failed; state of namespace $NS:" >&2
    kubectl -n "$NS" get chatplatforms,deploy,sts,pods,jobs -o wide >&2 || true
    kubectl -n "$NS" describe chatplatform "$RELEASE" >&2 || true
    kubectl -n "$NS" logs deploy/"$RELEASE"-operator --tail=50 >&2 || true
  fi
  if [ "${KEEP:-0}" != 1 ]; then
    case "$CLUSTER" in
      kind) kind delete cluster --name "$NAME" >/dev/null 2>&1 || true ;;
      k3d) k3d cluster delete "$NAME" >/dev/null 2>&1 || true ;;
    esac
  fi
  exit "$status"
}
trap cleanup EXIT

echo "--- cluster ($CLUSTER $NAME)"
case "$CLUSTER" in
  kind) kind get clusters 2>/dev/null | grep -qx "$NAME" || kind create cluster --name "$NAME" --wait 120s ;;
  k3d) k3d cluster list "$NAME" >/dev/null 2>&1 || k3d cluster create "$NAME" --wait ;;
  *) echo "CLUSTER must be kind or k3d" >&2; exit 2 ;;
esac

if [ "$BUILD" = 1 ]; then
  echo "--- image $IMAGE"
  docker build -t "$IMAGE" .
  case "$CLUSTER" in
    kind) kind load docker-image "$IMAGE" --name "$NAME" ;;
    k3d) k3d image import "$IMAGE" -c "$NAME" ;;
  esac
fi

repo="${IMAGE%:*}"; tag="${IMAGE##*:}"
echo "--- helm install $RELEASE (values-small.yaml)"
helm upgrade --install "$RELEASE" . -n "$NS" --create-namespace -f values-small.yaml \
  --set global.image.repository="$repo" --set global.image.tag="$tag" \
  --wait --timeout "${TIMEOUT}s"

echo "--- waiting for ChatPlatform $RELEASE to be Ready"
kubectl -n "$NS" wait chatplatform/"$RELEASE" --for=condition=Ready --timeout="${TIMEOUT}s"
kubectl -n "$NS" get chatplatforms

echo "--- helm test"
helm test "$RELEASE" -n "$NS" --logs --timeout 300s

echo "--- upgrade (migration hook, rolling update) and test again"
helm upgrade "$RELEASE" . -n "$NS" -f values-small.yaml --reuse-values --wait --timeout "${TIMEOUT}s"
kubectl -n "$NS" wait chatplatform/"$RELEASE" --for=condition=Ready --timeout="${TIMEOUT}s"
helm test "$RELEASE" -n "$NS" --logs --timeout 300s
echo "kind-smoke: OK"
