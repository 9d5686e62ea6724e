"""Types of the optional compiled extension built from kernels/_graphscan.c (absent when not
built). `scan` never raises on bad input: None means "not the plain form, decode it the
general way"."""

_Scanned = tuple[
    tuple[list[str | int], bool, int, bytearray, bytearray, bytearray, bytearray],
    dict[str, bytes],
]

def scan(data: bytes, /) -> _Scanned | None:
    """((node ids, has features, width, x float64 (N, width), rows int64 (E,), cols int64
    (E,), weights float64 (E,)), {"directed" | "method" | "graph_id": raw JSON bytes})."""
