"""The deferred lane's worker: drives every batch from ``validating`` to a final state.

A batch's requests are grouped by the deployment that serves each one's ``model`` (the routing table's
first choice, so a client never picks the upstream). A group whose deployment has a Batch API goes there as
one upstream batch (at the provider's batch price) and is polled every ``batches.poll_interval_s`` until it
is done, then its output and error files are read back and matched to the requests by our own custom ids.
Every other request runs through the normal pipeline (cache, coalescing, retries, fallbacks), at most
``batches.concurrency`` at once per batch. An upstream batch that cannot be submitted falls back to the
pipeline for its requests.

State lives in the store, so a restarted gateway resumes: upstream batches are polled again, requests not
yet answered through the pipeline are sent again. One instance drives a batch at a time (a lease in the
store, renewed at each pass). What a crash can repeat: an upstream batch submitted but not yet recorded is
submitted again, and a pipeline request answered but not yet recorded is sent again.

Every request's cost is handed to ``record`` (a :class:`DeferredCost`), which the app points at metrics; the
cost ledger will take it from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

from atajo.batches.store import BatchStore, Counts, Group, Item, StoredFile
from atajo.core.batches import BatchApi, BatchLine, DeferredCost, LineResult, result_line
from atajo.core.catalog import Catalog
from atajo.core.context import Principal, RequestContext
from atajo.core.deployments import Deployment
from atajo.core.pipeline import Handler
from atajo.core.requests import ChatRequest, EmbeddingsRequest, Request
from atajo.core.results import Completion, Usage
from atajo.errors import AtajoError, UpstreamError
from atajo.routing.table import ModelTable
from atajo.settings import BatchSettings
from atajo.stages.deferred_collect import Collector
from atajo.types import JSONObject

log = logging.getLogger("atajo.batches")

LOCAL = "pipeline"
"""The group of requests answered through the normal pipeline."""

Record = Callable[[DeferredCost], None]


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


class DeferredLane:
    def __init__(
        self,
        store: BatchStore,
        table: ModelTable,
        apis: Mapping[str, BatchApi],
        pipeline: Handler,
        catalog: Catalog,
        settings: BatchSettings,
        record: Record,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.table = table
        self.apis = apis
        self.pipeline = pipeline
        self.catalog = catalog
        self.settings = settings
        self.record = record
        self.clock = clock
        self.owner = new_id("worker_")
        self.lease_s = 3 * settings.poll_interval_s + 30
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._local: dict[str, asyncio.Task[None]] = {}
        self._deployments = {d.id: d for d in table.all_deployments()}
        self.collector = Collector(store, settings, new_id, self.wake, clock=clock)
        """Requests sent with ``x-atajo-priority: batch``, sealed into batches this worker runs."""
        self.passes = 0
        self.failures = 0

    # --- life cycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="atajo-deferred-lane")
        await self.collector.start()

    async def close(self) -> None:
        await self.collector.close()
        tasks = [t for t in (self._task, *self._local.values()) if t is not None]
        self._task = None
        self._local.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # the leases lapse on their own anyway
            await self.store.release(self.owner)

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        last_purge = 0.0
        while True:
            self._wake.clear()
            try:
                await self.step()
                if self.clock() - last_purge > 3600:
                    last_purge = self.clock()
                    await self.store.purge_files(last_purge)
            except Exception:  # a database or bug failure: logged and counted, tried again at the next pass
                self.failures += 1
                log.exception("deferred lane pass failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.poll_interval_s)

    async def step(self) -> None:
        """One pass over every unfinished batch this instance holds (or can take) the lease of."""
        self.passes += 1
        for batch_id in await self.store.active():
            now = self.clock()
            if not await self.store.claim(batch_id, self.owner, now, now + self.lease_s):
                continue
            batch = await self.store.get_batch(None, batch_id)
            if batch is not None:
                await self._advance(batch)

    # --- one batch --------------------------------------------------------------------------------

    async def _advance(self, batch: JSONObject) -> None:
        status = batch["status"]
        now = self.clock()
        if status == "validating":
            await self._plan(batch)
            if not await self._save(batch, "validating", status="in_progress", in_progress_at=int(now)):
                return
            status = "in_progress"
        if status == "in_progress" and now >= batch["expires_at"]:
            if not await self._save(batch, "in_progress", status="expiring"):
                return
            status = "expiring"
        if status in ("cancelling", "expiring"):
            await self._stop(batch)
            return
        if status == "in_progress":
            await self._poll(batch)
            await self._run_local(batch)
            counts = await self.store.counts(batch["id"])
            if counts.completed + counts.failed == counts.total:
                await self._finalize(batch, "completed")

    async def _plan(self, batch: JSONObject) -> None:
        """Group the pending requests by deployment; send each Batch API group upstream."""
        batch_id, endpoint = batch["id"], batch["endpoint"]
        groups: dict[str, list[Item]] = {}
        targets: dict[str, tuple[Deployment, str]] = {}
        unknown: list[Item] = []
        for item in await self.store.items(batch_id, "pending"):
            if item.grp is not None:
                continue
            try:
                public, deployment = self.table.plan(item.model)[0]
            except AtajoError:
                unknown.append(item)  # the model left the config after the batch was accepted
                continue
            if deployment.batch_api and deployment.provider in self.apis:
                groups.setdefault(deployment.id, []).append(item)
                targets[deployment.id] = (deployment, deployment.model_for(public if public != "*" else item.model))
            else:
                groups.setdefault(LOCAL, []).append(item)
        for item in unknown:
            item.result = _error("model_not_found", f"The model `{item.model}` is no longer configured.")
            item.ok = False
        await self.store.finish(batch_id, unknown)
        for grp, items in groups.items():
            if grp == LOCAL:
                await self.store.assign(batch_id, [i.idx for i in items], LOCAL, "pending")
                continue
            deployment, upstream_model = targets[grp]
            lines = [BatchLine(str(i.idx), dict(i.body, model=upstream_model)) for i in items]
            try:
                upstream = await self.apis[deployment.provider].submit(deployment, endpoint, lines)
            except UpstreamError as err:
                log.warning("batch %s: %s refused the batch (%s); its requests go through the pipeline",
                            batch_id, deployment.id, err.message)  # fmt: skip
                await self.store.assign(batch_id, [i.idx for i in items], LOCAL, "pending")
                continue
            await self.store.put_group(batch_id, Group(grp, deployment.id, upstream.id, upstream.status))
            await self.store.assign(batch_id, [i.idx for i in items], grp, "submitted")

    async def _poll(self, batch: JSONObject, *, cancel: bool = False) -> bool:
        """Read every unfinished upstream batch (asking it to cancel first if ``cancel``); collect the results
        of those that are done. True when none is left running."""
        settled = True
        for group in await self.store.groups(batch["id"]):
            if group.status in ("completed", "failed", "expired", "cancelled"):
                continue
            deployment = self._deployments.get(group.deployment)
            if deployment is None or group.upstream_id is None:
                await self._collect(batch, group, None, "deployment_removed")
                continue
            api = self.apis[deployment.provider]
            try:
                if cancel and group.status != "cancelling":
                    upstream = await api.cancel(deployment, group.upstream_id)
                else:
                    upstream = await api.retrieve(deployment, group.upstream_id)
                results = await api.results(deployment, upstream) if upstream.done else None
            except UpstreamError as err:
                log.warning("batch %s: polling %s failed (%s); trying again later", batch["id"], deployment.id,
                            err.message)  # fmt: skip
                settled = False
                continue
            if results is None:
                settled = False
                if upstream.status != group.status:
                    await self.store.put_group(
                        batch["id"], Group(group.grp, group.deployment, upstream.id, upstream.status)
                    )
                continue
            await self._collect(batch, group, results, upstream.status)
        return settled

    async def _collect(
        self, batch: JSONObject, group: Group, results: Sequence[LineResult] | None, status: str
    ) -> None:
        """Match an upstream batch's result lines to its requests by our custom ids; price each answer at the
        batch price. A request with no line failed with the upstream batch's status."""
        by_id = {r.custom_id: r for r in results or ()}
        deployment = self._deployments.get(group.deployment)
        done: list[Item] = []
        for item in await self.store.items(batch["id"], "submitted"):
            if item.grp != group.grp:
                continue
            line = by_id.get(str(item.idx))
            if line is None:
                item.result = _error(f"batch_{status}", f"The upstream batch ended ({status}) before this request ran.")
                item.ok = False
            elif line.status_code is not None:
                item.result = {"status_code": line.status_code, "body": line.body}
                item.ok = 200 <= line.status_code < 300 and line.body is not None
                if item.ok and line.body is not None:
                    self._price(batch, item, line.body, deployment, via_batch_api=True)
            else:
                error = line.error or {"code": "batch_error", "message": "The upstream batch gave no answer."}
                item.result = {"error": error}
                item.ok = False
            done.append(item)
        await self.store.finish(batch["id"], done)
        await self.store.put_group(batch["id"], Group(group.grp, group.deployment, group.upstream_id, status))

    def _price(
        self,
        batch: JSONObject,
        item: Item,
        body: JSONObject,
        deployment: Deployment | None,
        *,
        via_batch_api: bool,
        sync_cost: int | None = None,
    ) -> None:
        usage = Usage.from_openai(body.get("usage"))
        if usage is None:
            return
        item.input_tokens, item.output_tokens = usage.prompt_tokens, usage.completion_tokens
        upstream_model = str(body.get("model") or item.model)
        info = self.catalog.get(upstream_model)
        if via_batch_api:
            if info is None:
                return
            item.sync_cost_micros = info.cost_micros(usage)
            item.cost_micros = info.batch_cost_micros(usage)
        else:
            item.cost_micros = item.sync_cost_micros = sync_cost or 0
        self.record(
            DeferredCost(
                tenant=batch["_atajo"]["tenant"],
                batch_id=batch["id"],
                custom_id=item.custom_id,
                model=item.model,
                upstream_model=upstream_model,
                deployment=deployment.id if deployment is not None else "",
                via_batch_api=via_batch_api,
                cost_micros=item.cost_micros,
                sync_cost_micros=item.sync_cost_micros,
            )
        )

    # --- the pipeline path ------------------------------------------------------------------------

    async def _run_local(self, batch: JSONObject) -> None:
        """Start answering the batch's pipeline requests not answered yet, unless that is under way."""
        batch_id = batch["id"]
        task = self._local.get(batch_id)
        if task is not None and not task.done():
            return
        items = [i for i in await self.store.items(batch_id, "pending") if i.grp == LOCAL]
        if items:
            self._local[batch_id] = asyncio.get_running_loop().create_task(self._local_batch(batch, items))

    async def _local_batch(self, batch: JSONObject, items: list[Item]) -> None:
        try:
            gate = asyncio.Semaphore(self.settings.concurrency)
            await asyncio.gather(*(self._one(batch, item, gate) for item in items))
        except Exception:  # a database failure or a bug: what was not recorded runs again at the next pass
            self.failures += 1
            log.exception("batch %s: running requests through the pipeline failed", batch["id"])
        finally:
            self._local.pop(batch["id"], None)
            self.wake()

    async def _one(self, batch: JSONObject, item: Item, gate: asyncio.Semaphore) -> None:
        async with gate:
            internal = batch["_atajo"]
            request: Request = (
                ChatRequest(item.model, item.body)
                if batch["endpoint"] == "/v1/chat/completions"
                else EmbeddingsRequest(item.model, item.body)
            )
            request_id = new_id("batch_req_")
            ctx = RequestContext(
                request_id=request_id,
                route="batch",
                headers={},
                principal=Principal(internal["key"], tenant=internal["tenant"]),
            )
            try:
                result = await self.pipeline(request, ctx)
                if not isinstance(result, Completion):  # streams are refused when the file is read
                    raise AtajoError("a batch request answered with a stream")
                item.result = {"status_code": 200, "body": result.body, "request_id": request_id}
                item.ok = True
                deployment = self._deployments.get(ctx.deployment or "")
                self._price(batch, item, result.body, deployment, via_batch_api=False, sync_cost=ctx.cost_micros)
            except AtajoError as err:
                item.result = {"status_code": err.status, "body": {"error": err.to_openai()}, "request_id": request_id}
                item.ok = False
            await self.store.finish(batch["id"], [item])

    # --- ending -----------------------------------------------------------------------------------

    async def _stop(self, batch: JSONObject) -> None:
        """Cancelling (or expiring): stop the pipeline requests, cancel the upstream batches, and once they
        have all stopped, end the batch with what was answered."""
        task = self._local.pop(batch["id"], None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not await self._poll(batch, cancel=True):
            return
        expiring = batch["status"] == "expiring"
        code, what = ("batch_expired", "expired") if expiring else ("batch_cancelled", "was cancelled")
        left = [i for i in await self.store.items(batch["id"]) if i.state != "done"]
        for item in left:
            item.result = _error(code, f"This request was not run: the batch {what}.")
            item.ok = False
        await self.store.finish(batch["id"], left)
        await self._finalize(batch, "expired" if expiring else "cancelled")

    async def _finalize(self, batch: JSONObject, final: str) -> None:
        """Write the output and error files, then the final state."""
        previous = batch["status"]
        now = self.clock()
        tenant = batch["_atajo"]["tenant"]
        output: list[bytes] = []
        errors: list[bytes] = []
        for item in await self.store.items(batch["id"]):
            line = result_line(new_id("batch_req_"), item.custom_id, item.result or {})
            (output if item.ok else errors).append(line)
        files: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for field, lines, kind in (("output_file_id", output, "output"), ("error_file_id", errors, "error")):
            if lines:
                files[field] = await self._write_file(tenant, f"{batch['id']}_{kind}.jsonl", b"".join(lines), now)
        counts = await self.store.counts(batch["id"])
        fields: JSONObject = {
            "status": final,
            f"{final}_at": int(now),
            **files,
            "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
            "usage": usage_of(counts),
        }
        if final == "completed":
            fields["finalizing_at"] = int(now)
        if await self._save(batch, previous, **fields):
            log.info("batch %s %s: %d answered, %d failed", batch["id"], final, counts.completed, counts.failed)

    async def _write_file(self, tenant: str, filename: str, content: bytes, now: float) -> str:
        file_id = new_id("file-")
        expires = now + self.settings.keep_files_s
        await self.store.put_file(
            StoredFile(file_id, tenant, "batch_output", filename, len(content), now, expires), content
        )
        return file_id

    async def _save(self, batch: JSONObject, expect: str, **fields: object) -> bool:
        """Change the batch if its status is still ``expect`` (a cancel may have come in meanwhile)."""
        batch.update(fields)
        return await self.store.save_batch(batch, expect)


def usage_of(counts: Counts) -> JSONObject:
    """The batch object's ``usage``: OpenAI's token fields, and what it cost, at the price paid and at the
    synchronous price (millionths of the catalog currency)."""
    return {
        "input_tokens": counts.input_tokens,
        "output_tokens": counts.output_tokens,
        "total_tokens": counts.input_tokens + counts.output_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
        "cost_micros": counts.cost_micros,
        "sync_cost_micros": counts.sync_cost_micros,
        "saved_micros": counts.sync_cost_micros - counts.cost_micros,
    }


def _error(code: str, message: str) -> JSONObject:
    return {"error": {"code": code, "message": message}}
