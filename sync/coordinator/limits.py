"""What one device message may cost the coordinator before it is decoded (issue 16 item 2).

Pure: config in, bounds out. Telemetry, alerts and replies are small by SPEC §6; a result
is as large as its embedding, so its cap is a config key. A body beyond its kind's bound is
refused before `json.loads` builds it, and a store transaction holds at most
`receipt_batch_bytes` of decoded bodies, so ingest memory is bounded whatever devices send.
"""

from __future__ import annotations

from dgdm.sync.coordinator.config import CoordinatorConfig
from dgdm.sync.envelope import BodyLimits, Kind

KIB = 1024
MIB = 1024 * KIB
# A telemetry batch of a few hundred samples, an alert, a reply: far below this.
SMALL_BODY_BYTES = 256 * KIB
# Real JSON deflates 3-20:1; beyond 100:1 above the floor it is a bomb, not data.
MAX_RATIO = 100
SMALL_RATIO_FLOOR = 64 * KIB
# A degenerate (all-zero) embedding deflates ~1000:1, so results get a higher floor.
RESULT_RATIO_FLOOR = MIB
# No SPEC body nests deeper than 5; 32 leaves room for alert `details` and command data.
MAX_DEPTH = 32
# A result holds a handful of arrays and objects; telemetry three per sample.
MAX_CONTAINERS = 16_384
# Values (array elements, object members): a telemetry sample has ~15; a result one per
# node id, so its bound admits 250,000 nodes (the agent's default max_nodes is 100,000).
SMALL_MAX_VALUES = 32_768
RESULT_MAX_VALUES = 262_144
# Decoded bodies in one store transaction (Python objects cost up to ~15x their JSON
# text, so this keeps a transaction's bodies under ~60 MB); a larger single message goes
# alone.
RECEIPT_BATCH_BYTES = 4 * MIB  # not a config key: it bounds memory, not throughput


def body_limits(config: CoordinatorConfig, kind: Kind) -> BodyLimits:
    if kind is Kind.RESULT:
        return BodyLimits(
            max_bytes=config.coordinator.max_result_body_bytes,
            max_ratio=MAX_RATIO,
            ratio_floor=RESULT_RATIO_FLOOR,
            max_depth=MAX_DEPTH,
            max_containers=MAX_CONTAINERS,
            max_values=RESULT_MAX_VALUES,
        )
    return BodyLimits(
        max_bytes=SMALL_BODY_BYTES,
        max_ratio=MAX_RATIO,
        ratio_floor=SMALL_RATIO_FLOOR,
        max_depth=MAX_DEPTH,
        max_containers=MAX_CONTAINERS,
        max_values=SMALL_MAX_VALUES,
    )


def limits_by_kind(config: CoordinatorConfig) -> dict[Kind, BodyLimits]:
    return {kind: body_limits(config, kind) for kind in Kind}
