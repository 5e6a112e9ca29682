"""A bounded LRU of full (untrimmed) projected image features, keyed by the image's content.

A follow-up turn of a conversation sends the same image again (OpenAI-style clients are stateless). With the
cache its prefill skips the vision tower and the projector: the features are looked up, fed to the model as
`cross_attention_states`, and trimmed again for the new question (the cache holds every token, so nothing
the first question dropped is lost). Each image slot of a batch is one entry: its processed inputs
(pixel values, aspect-ratio id and mask, padding tiles and padding images included) are hashed, so an entry
is exactly what the vision tower would compute for that slot.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily



def slot_key(pixel_values: torch.Tensor, aspect_ratio_id: torch.Tensor, aspect_ratio_mask: torch.Tensor) -> str:
    """Content hash of one image slot: (tiles, channels, height, width) pixels, its ratio id and (tiles,) mask."""
    digest = hashlib.blake2b(digest_size=20)
    for tensor in (pixel_values, aspect_ratio_id, aspect_ratio_mask):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """LRU of `key -> (tiles * patches, hidden)` feature tensors whose bytes never exceed `max_bytes`; each entry
    is its own contiguous copy, so the counted bytes are the bytes held.

    Thread-safe. An entry larger than the whole cache is not stored. `hits`, `misses` and `evicted` count
    lookups and evictions since start; `bytes` is what the entries hold now.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"feature cache max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = self.evicted = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Store a copy of `features` that owns exactly its `nbytes` (a row of a batch tensor is a view that
        would keep the whole batch alive)."""
        size = features.nbytes
        with self._lock:
            if key in self._entries or size > self.max_bytes:
                return
            while self.bytes + size > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self.bytes -= dropped.nbytes
                self.evicted += 1
            self._entries[key] = features.clone(memory_format=torch.contiguous_format)
            self.bytes += size

    def collect(self):
        """Prometheus collector: register the cache on a registry to export its counts."""
        for name, help_text, value in (
            ("trimllama_feature_cache_hits", "Image slots whose features came from the feature cache", self.hits),
            ("trimllama_feature_cache_misses", "Image slots whose features the vision tower computed", self.misses),
            ("trimllama_feature_cache_evicted", "Feature cache entries evicted to stay under the byte limit", self.evicted),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("trimllama_feature_cache_bytes", "Bytes the feature cache holds", value=self.bytes)
        yield GaugeMetricFamily("trimllama_feature_cache_entries", "Image slots in the feature cache", value=len(self))
        yield GaugeMetricFamily("trimllama_feature_cache_max_bytes", "Byte limit of the feature cache", value=self.max_bytes)


def cached_image_features(cache: FeatureCache, facts, model, batch: dict, keys: list[list[str]]) -> torch.Tensor:
    """(batch, images * tiles * patches, hidden): every slot's features, from the cache or computed (and cached).

    `batch` holds the model's image inputs on its device; `keys[sample][image]` the slots' `slot_key`s;
    `facts` is the model's adapter class (`image_features`).
    """
    found: dict[str, torch.Tensor] = {}
    missing: list[tuple[int, int]] = []
    for sample, row in enumerate(keys):
        for image, key in enumerate(row):
            if key in found or any(keys[s][i] == key for s, i in missing):
                continue
            features = cache.get(key)
            if features is None:
                missing.append((sample, image))
            else:
                found[key] = features
    if missing:
        samples = torch.tensor([s for s, _ in missing])
        images = torch.tensor([i for _, i in missing])
        slots = [batch[name][samples, images][:, None] for name in facts.image_inputs]  # one image per row
        computed = facts.image_features(model, *slots)  # (missing, tiles * patches, hidden)
        for (sample, image), features in zip(missing, computed):
            key = keys[sample][image]
            found[key] = features
            cache.put(key, features)
    return torch.stack([torch.cat([found[key] for key in row]) for row in keys])
