"""Stage `extract`: image shards → patch features of the tokenizer's encoder in `data/features.zarr`.

Streams one shard at a time (memory does not grow with the dataset). Resumable: a killed run leaves
`<out>.partial`, and the next run with the same settings skips the shards already complete.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.config import Params
from pipeline.features import create_or_resume, extract_shard, fingerprint, shard_layout
from pipeline.io import promote
from pipeline.prepare import MANIFEST
from pipeline.stage import MapJobs, stage_main
from pipeline.tokenizer import encoder_from_params

log = logging.getLogger("digit.extract")
PATHS = {"images": "data/images", "out": "data/features.zarr", "metrics": "metrics/extract.json"}


def run(
    params: Params,
    images: str = PATHS["images"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    encoder = encoder_from_params(params.encoder, params.base)
    layout = shard_layout(images)
    manifest_sha = hashlib.sha256((Path(images) / MANIFEST).read_bytes()).hexdigest()
    desc = encoder.describe()
    attrs = {**desc, "images_manifest_sha256": manifest_sha, "fingerprint": fingerprint([desc, manifest_sha])}
    partial = Path(out + ".partial")
    group, done = create_or_resume(
        partial, layout, encoder.num_tokens, encoder.dim, params.prepare.shard_size, attrs
    )
    blocks = [b for split in layout.values() for b in split]
    total = sum(b.count for b in blocks)
    log.info(
        "extract: %d images, %s (%s, layer %d) → [T=%d, D=%d] per image%s",
        total,
        desc["encoder"],
        desc["source"],
        desc["layer"],
        encoder.num_tokens,
        encoder.dim,
        f"; resuming, {done}/{len(blocks)} shards already done" if done else "",
    )

    def features(batch):
        return encoder.patch_features(batch).cpu().numpy()

    def job(block, _out_dir):
        return extract_shard(group, block, images, features, params.extract.batch_size)

    if map_jobs is not None:
        wrote = map_jobs(job, blocks, partial)
    else:
        with tqdm(total=total, unit="img", desc="extract", mininterval=1.0) as bar:
            wrote = []
            for block in blocks:
                fresh = extract_shard(group, block, images, features, params.extract.batch_size, bar.update)
                if not fresh:
                    bar.update(block.count)
                wrote.append(fresh)
    promote(partial, out)
    summary: dict[str, Any] = {
        "tokens_per_image": encoder.num_tokens,
        "dim": encoder.dim,
        "shards_resumed": len(wrote) - sum(bool(w) for w in wrote),
        "encoder_source": desc["source"],
        "layer": desc["layer"],
    }
    for split, split_blocks in layout.items():
        summary[f"{split}_images"] = sum(b.count for b in split_blocks)
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("extract", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
