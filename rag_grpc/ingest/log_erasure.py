"""Erasing forgotten documents from the NATS write log.

Forgetting documents (Delete with forget) also erases, from NATS, every log
entry that carried a version of them (their text and vectors). The process
that published the forget does it once its replica has applied it: other
documents of those entries whose latest version they hold are published
again first (conditional on the log not having moved, so nothing newer is
overwritten), each erased sequence is recorded in the <P>_ERASED bucket, then
the entries are erased (NATS overwrites them on disk). A replica that meets a
missing sequence goes on only if that bucket says it was erased on purpose
(`LogFollower` checks the gaps it meets)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import nats.js.errors

from rag_grpc.errors import DeadlineExceeded, InvalidArgument, Unavailable
from rag_grpc.index.writes import PreparedUpsert
from rag_grpc.ingest.log_entries import decode_prepared, encode_prepared_upsert, only_documents
from rag_grpc.ingest.nats_client import NATS_ERRORS

if TYPE_CHECKING:
    from rag_grpc.ingest.nats_log import NatsIngestion

log = logging.getLogger(__name__)

# JetStream's error for a publish whose Nats-Expected-Last-Sequence is not the
# stream's last sequence (another write came first).
WRONG_LAST_SEQUENCE = 10071
# Tries at republishing the other documents of entries to erase while other
# writes keep moving the log's end.
ERASE_ATTEMPTS = 20


class LogEraser:
    """Erases a NatsIngestion's forgotten documents from its write log."""

    def __init__(self, ingestion: NatsIngestion) -> None:
        self.ingestion = ingestion

    async def erase(self, namespace: str, doc_ids: Sequence[str], forget_seq: int) -> None:
        """Erase every entry before the forget that carried a version of these
        documents, once the other documents those entries hold are safe."""
        ingestion = self.ingestion
        store = ingestion.retriever.store
        carried = await ingestion.in_thread(
            store.log_documents, ingestion.log_name, namespace, doc_ids
        )
        seqs = sorted({s for found in carried.values() for s in found if s < forget_seq})
        if not seqs:
            return
        try:
            doomed, republished = await self._republish_others(namespace, set(doc_ids), seqs)
            # Recorded before erasing: a replica that then finds the entry
            # missing must know it was erased on purpose, not dropped.
            for seq in doomed:
                await ingestion.erased.put(str(seq), str(forget_seq).encode())
            for seq in doomed:
                await self._erase_entry(seq)
        except NATS_ERRORS as exc:
            raise Unavailable(
                f"the documents are forgotten by the replicas, but erasing their copies from "
                f"the NATS log at {ingestion.where} failed: {exc or type(exc).__name__}; run "
                "the same forget again to finish"
            ) from None
        await ingestion.in_thread(lambda: store.drop_log_documents(ingestion.log_name, seqs=seqs))
        log.info(
            "erased %d entries of %s that held forgotten documents of %s "
            "(%d other documents published again first)",
            len(doomed),
            ingestion.writes_stream,
            namespace,
            republished,
        )

    async def _republish_others(
        self, namespace: str, forgotten: set[str], seqs: list[int]
    ) -> tuple[list[int], int]:
        """Publish again the other documents of the entries to erase whose
        latest version they hold, so a replica that has not applied those
        entries yet still ends with them. Returns the entries to erase and
        how many documents were published again.

        Decided on this replica's store at the log's end and published only
        if the log has not moved since (Nats-Expected-Last-Sequence): a
        newer write to one of those documents is never overwritten."""
        ingestion = self.ingestion
        store = ingestion.retriever.store
        for _ in range(ERASE_ATTEMPTS):
            info = await ingestion.js.stream_info(ingestion.writes_stream)
            last = int(info.state.last_seq)
            try:
                await ingestion.follower.wait_applied(last)
            except DeadlineExceeded:
                raise DeadlineExceeded(
                    "the documents are forgotten by this replica, but it had not caught up "
                    f"with the log's end (entry {last}) in time to erase their copies from "
                    "it; run the same forget again to finish"
                ) from None
            if await ingestion.in_thread(store.position, ingestion.log_name) != last:
                continue  # written meanwhile; decide again at the new end
            doomed: list[int] = []
            keep: list[PreparedUpsert] = []
            for seq in seqs:
                try:
                    msg = await ingestion.js.get_msg(ingestion.writes_stream, seq)
                except nats.js.errors.NotFoundError:
                    continue  # dropped by retention, or erased by an earlier forget
                try:
                    entry = decode_prepared(json.loads(msg.data))
                except (ValueError, InvalidArgument):
                    doomed.append(seq)  # nothing in it was ever applied
                    continue
                if not isinstance(entry, PreparedUpsert) or entry.namespace != namespace:
                    continue
                ids = {d.id for d in entry.documents}
                if not ids & forgotten:
                    continue
                doomed.append(seq)
                if ids - forgotten:
                    keep.append(await ingestion.in_thread(self._latest_in, entry, seq, forgotten))
            if await ingestion.in_thread(store.position, ingestion.log_name) != last:
                continue
            expected, count = last, 0
            try:
                for part in keep:
                    if not part.documents:
                        continue
                    payload = json.dumps(encode_prepared_upsert(part)).encode()
                    ack = await ingestion.js.publish(
                        ingestion.writes_subject,
                        payload,
                        headers={"Nats-Expected-Last-Sequence": str(expected)},
                    )
                    expected, count = int(ack.seq), count + len(part.documents)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    raise
                # Another write came first. What was published is the latest
                # version of its documents at that point, so harmless; decide again.
                continue
            return doomed, count
        raise Unavailable(
            f"the documents are forgotten by the replicas, but writes kept arriving while "
            f"{ERASE_ATTEMPTS} tries to erase their copies from the log ran; run the same "
            "forget again to finish"
        )

    def _latest_in(self, entry: PreparedUpsert, seq: int, forgotten: set[str]) -> PreparedUpsert:
        """The documents of the entry (not forgotten) that this store holds as
        the entry wrote them and that no later entry carries."""
        ingestion = self.ingestion
        store = ingestion.retriever.store
        others = [d for d in entry.documents if d.id not in forgotten]
        same = store.unchanged(entry.namespace, others)
        carried = store.log_documents(ingestion.log_name, entry.namespace, list(same))
        return only_documents(entry, {i for i in same if carried.get(i, [seq])[-1] == seq})

    async def _erase_entry(self, seq: int) -> None:
        # The JetStream API itself, to say no_erase = false: NATS overwrites
        # the message where it lies on disk instead of only unlinking it.
        ingestion = self.ingestion
        reply = await ingestion.nc.request(
            f"$JS.API.STREAM.MSG.DELETE.{ingestion.writes_stream}",
            json.dumps({"seq": seq, "no_erase": False}).encode(),
            timeout=ingestion.config.connect_timeout_s,
        )
        error = json.loads(reply.data).get("error")
        if not error:
            return
        try:
            await ingestion.js.get_msg(ingestion.writes_stream, seq)
        except nats.js.errors.NotFoundError:
            return  # gone already (retention, or another forget erased it)
        raise Unavailable(
            f"NATS at {ingestion.where} did not erase entry {seq} of {ingestion.writes_stream}: "
            f"{error.get('description', error)}; run the same forget again to finish"
        )
