"""Allocation bounds of the property tests: the tracemalloc peak of one decode, and the most a
decoder may hold per input byte."""

from __future__ import annotations

import tracemalloc

from property_strategies import result_or_gateway_error

KiB = 1024


class Peak:
    """tracemalloc peak of one call, above what was allocated before it (numpy buffers count:
    numpy reports its allocations to tracemalloc)."""

    def __enter__(self) -> Peak:
        tracemalloc.start()
        return self

    def measure(self, fn, *args):
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            return result_or_gateway_error(fn, *args)
        finally:
            self.bytes = tracemalloc.get_traced_memory()[1] - base

    def __exit__(self, *exc) -> None:
        tracemalloc.stop()


# Declared bounds: the most a decoder may hold per input byte, plus a constant for the small
# fixed objects of one request. Python objects are what make the multiple larger than 1: a BYTES
# element of 2 bytes (6 on the wire) becomes a 51-byte str plus an 8-byte slot, a JSON "[]," a
# 56-byte list plus its slot. A decoder that allocated for a claimed shape instead (np.empty of
# 2**20 elements from a 100-byte body) passes these bounds by megabytes.
RAW_BYTES_PER_BYTE = 16
JSON_BYTES_PER_BYTE = 48
GRPC_BYTES_PER_BYTE = 48  # typed contents: a 2-byte varint becomes a 32-byte int in a list slot
CONSTANT = 64 * KiB  # one request's fixed objects; the largest seen in these tests is ~25 KiB
