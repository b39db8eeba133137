"""The Prefect flow runs the same stage code as DVC (one ephemeral server for the session)."""

import yaml

from pipeline.flow import digit_flow
from pipeline.prepare import read_manifest
from stages import prepare


def test_flow_runs_prepare_like_the_stage(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(
        yaml.safe_dump(
            {"base": {"image_size": 32}, "prepare": {"train_size": 20, "val_size": 6, "shard_size": 8}}
        )
    )
    out = tmp_path / "flow_images"
    result = digit_flow(
        str(params_path),
        ["prepare"],
        {"prepare": {"out": str(out), "metrics": str(tmp_path / "prepare.json")}},
    )
    assert result["prepare"]["train_shards"] == 3 and result["prepare"]["val_images"] == 6
    assert (tmp_path / "prepare.json").is_file()
    # Shards written by concurrent Prefect tasks are byte-identical to the DVC stage's sequential ones.
    from pipeline.config import load_params

    prepare.run(load_params(params_path), out=str(tmp_path / "stage_images"))
    for shard in sorted(out.glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "stage_images" / shard.name).read_bytes()
    assert read_manifest(out).equals(read_manifest(tmp_path / "stage_images"))
