"""The stage registry (trainer/stages.py) is what the trainer, the server and the API read."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from pydantic import ValidationError

from trainer.protocol import ArtifactKind, JobSpec
from trainer.stages import STAGES, parse_config


def test_presets_list_exactly_the_registered_stages(shared_server):
    with shared_server.client() as client:
        listed = client.get("/api/presets").json()
    assert list(listed) == list(STAGES)
    for name, stage in STAGES.items():
        entry = listed[name]
        assert entry["presets"] == list(stage.presets)
        assert [field["name"] for field in entry["fields"]] == [f.name for f in dataclasses.fields(stage.config)]
        assert (entry["title"], entry["description"]) == (stage.title, stage.description)
        assert (entry["needs_encoder"], entry["resumable"]) == (stage.needs_encoder, stage.resumable)
        assert entry["produces"] == list(stage.produces)


def test_an_unknown_stage_is_refused_with_the_registered_names(shared_server):
    with shared_server.client() as client:
        created = client.post("/api/jobs", json={"stage": "stage9", "dataset": "synthetic"})
        listed = client.get("/api/jobs", params={"stage": "stage9"})
    for response in (created, listed):
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert detail.startswith("Invalid stage 'stage9'; expected ")
        assert all(repr(name) in detail for name in STAGES), detail


def test_what_a_stage_needs_decides_what_a_job_may_name(shared_server):
    producers = [name for name, stage in STAGES.items() if ArtifactKind.encoder in stage.produces]
    with shared_server.client() as client:
        for name, stage in STAGES.items():
            if stage.needs_encoder:
                response = client.post("/api/jobs", json={"stage": name})
                assert response.status_code == 422
                assert response.json()["detail"] == (f"A {name} job needs exactly one of 'after' "
                                                      f"(a {' or '.join(producers)} job id) or 'encoder_artifact'.")
            else:
                response = client.post("/api/jobs", json={"stage": name, "encoder_artifact": 1})
                assert response.status_code == 422
                assert "'after' and 'encoder_artifact' apply to" in response.json()["detail"]


def test_every_listed_preset_is_a_valid_config():
    for name, stage in STAGES.items():
        for preset in stage.presets:
            assert type(parse_config(name, {"preset": preset})) is stage.config


def test_every_runner_takes_the_one_signature():
    for stage in STAGES.values():
        runner = stage.load_runner()
        assert list(inspect.signature(runner).parameters) == ["spec", "config", "reporter", "world"], stage.runner


def test_a_job_spec_names_a_registered_stage():
    spec = {"job_id": 1, "dataset": "synthetic", "config": {}, "job_dir": "/tmp/job", "api_url": "", "token": "t"}
    for name in STAGES:
        assert JobSpec.model_validate({**spec, "stage": name}).stage == name
    with pytest.raises(ValidationError, match="Invalid stage 'stage9'; expected"):
        JobSpec.model_validate({**spec, "stage": "stage9"})
