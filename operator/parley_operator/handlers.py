"""kopf handlers: what the operator reacts to.

* create/update/resume of a ChatPlatform -> converge its children right away;
* a daemon per ChatPlatform -> every `spec.scaling.pollIntervalSeconds`: converge children
  again (reverting hand edits), read Redis, autoscale, write status.

A daemon rather than a timer because the poll interval is per object and may change at run
time; kopf keeps the daemon's `body` live, so it sees spec edits without a restart.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from parley_operator import autoscaler, children, events, exporter, leader, resources
from parley_operator import status as st
from parley_operator.kube import Kube, login
from parley_operator.spec import SpecError, parse_body

RESOURCE = (resources.GROUP, resources.VERSION, resources.PLURAL)
FINALIZER = "parley.dev/operator"


@kopf.on.login()
def authenticate(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
    return login(settings)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Our own names in annotations/finalizers, so `kubectl get -o yaml` says who put them there.
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="parley.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="parley.dev")
    # Only our Events (scaling, drift, metrics) and kopf's warnings; not "handler succeeded".
    settings.posting.level = logging.WARNING
    # No CRD/namespace scanning: the CRD is installed with the chart before the operator, and
    # skipping the scan removes cluster-wide list/watch on CRDs and namespaces from the RBAC.
    settings.scanning.disabled = True
    events.reset()
    # Writes stop the moment this process may no longer hold the leader Lease (leader.py).
    memo.kube = Kube(lambda: login(settings), may_write=leader.may_write)
    memo.exporter = await exporter.start()


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    kube = memo.get("kube")
    if kube is not None:
        await kube.close()
    runner = memo.get("exporter")
    if runner is not None:
        await runner.cleanup()


def _state(memo: kopf.Memo) -> autoscaler.PlatformState:
    if "platform" not in memo:
        memo.platform = autoscaler.PlatformState()
    return memo.platform  # type: ignore[no-any-return]


async def _invalid(kube: Kube, body: kopf.Body, exc: SpecError) -> None:
    conditions = st.merge_conditions(
        (await autoscaler.current_status(kube, body)).get("conditions"),
        [st.Condition("Ready", False, "InvalidSpec", str(exc))],
        body.metadata.get("generation"),
    )
    await autoscaler.write_status(kube, body, {"conditions": conditions})
    events.post(body, type="Warning", reason="InvalidSpec", message=str(exc))


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@kopf.on.update(*RESOURCE, field="spec")
async def reconcile(body: kopf.Body, memo: kopf.Memo, reason: str, logger: logging.Logger, **_: Any) -> None:
    kube: Kube = memo.kube
    try:
        spec = parse_body(body)
    except SpecError as exc:
        await _invalid(kube, body, exc)
        raise kopf.PermanentError(str(exc)) from exc
    async with _state(memo).lock:
        previous = await autoscaler.current_status(kube, body)
        spec_changed = body.metadata.get("generation") != previous.get("observedGeneration")
        converged = await children.ensure_children(kube, body, spec, spec_changed)
        conditions = st.merge_conditions(
            previous.get("conditions"), [converged.readiness()],
            body.metadata.get("generation"),
        )
        await autoscaler.write_status(kube, body, {
            # A generation is observed once its spec is applied; a child the API server rejected
            # keeps the previous one, and the poller retries (Ready=False ConvergeFailed says why).
            **({} if converged.errors else {"observedGeneration": body.metadata.get("generation")}),
            "summary": st.summary(converged.deployments),
            "conditions": conditions,
        })
    if converged.errors:
        logger.warning("children not converged (%s): %s", reason, converged.errors)
    else:
        logger.info("children converged (%s)", reason)


@kopf.daemon(*RESOURCE, cancellation_timeout=10.0)
async def autoscale(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped,
                    logger: logging.Logger, **_: Any) -> None:
    kube: Kube = memo.kube
    state = _state(memo)
    try:
        # kopf may (re)spawn a daemon while it is already shutting down; `kube.closed` ends it.
        while not stopped and not kube.closed:
            interval = 15.0
            try:
                # The generation the spec is parsed from, read together (no await between):
                # kopf's body is live, and the status must not claim a later, unapplied spec.
                generation = body.metadata.get("generation")
                spec = parse_body(body)
                interval = float(spec.scaling.poll_interval_seconds)
                async with state.lock:
                    await autoscaler.poll(kube, body, spec, state, generation=generation)
            except SpecError:
                pass  # reported by reconcile(); keep polling in case the spec gets fixed
            except kopf.TemporaryError as exc:
                logger.warning("poll skipped: %s", exc)
            except Exception:
                if stopped or kube.closed:
                    break  # the operator is shutting down under us; nothing to report
                # One failed poll (an API hiccup) must not end autoscaling for this object.
                logger.exception("poll failed; retrying in %ss", interval)
            await stopped.wait(interval)
    finally:
        exporter.forget(body.metadata.namespace, body.metadata.name)
        await state.close()
