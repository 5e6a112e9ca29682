"""The image pool refuses, with one message naming `--shared-pool`, a KV pool it was not written for (no server)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("sglang.srt")
os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, UnquantizedKVCacheMethod  # noqa: E402

from trimllama.errors import UnsupportedModelError  # noqa: E402
from trimllama.integrations.sglang.layout import PoolLayout  # noqa: E402
from trimllama.integrations.sglang.model import check_pool  # noqa: E402

LAYOUT = PoolLayout(layers=5, cross_layers=(1, 3))


def plain_pool(quantized: bool = False, start_layer: int = 0, layer_num: int = 5) -> MHATokenToKVPool:
    """An MHATokenToKVPool with only the fields `check_pool` reads (no buffers allocated)."""
    pool = object.__new__(MHATokenToKVPool)
    pool.quant_method = object() if quantized else UnquantizedKVCacheMethod()
    pool.start_layer, pool.layer_num = start_layer, layer_num
    return pool


@pytest.mark.parametrize(
    ("pool", "problem"),
    [
        (object(), "its KV pool is object, not MHATokenToKVPool"),
        (plain_pool(quantized=True), "its KV cache is quantized"),
        (plain_pool(start_layer=2, layer_num=3), "its pool holds layers 2..4 of 5"),
    ],
)
def test_a_pool_it_was_not_written_for_is_refused(pool, problem):
    with pytest.raises(UnsupportedModelError) as refused:
        check_pool(pool, LAYOUT)
    assert problem in str(refused.value) and "trimllama sglang --shared-pool" in str(refused.value)


def test_the_plain_pool_over_every_layer_passes():
    check_pool(plain_pool(), LAYOUT)
