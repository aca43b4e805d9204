"""slurm.profile: loading, validation errors naming file and field, executor parameters."""
import pytest

from slurm.profile import PROFILES_DIR, ProfileError, load_profile


def test_shipped_profiles_load():
    ci = load_profile("local-ci")
    assert ci.partition == "debug" and ci.gpus_per_node == 0 and ci.processes_per_node() == 1
    gpu = load_profile(PROFILES_DIR / "example-gpu-cluster.yaml")
    assert gpu.gpus_per_node == 8 and gpu.processes_per_node() == 8
    params = gpu.executor_parameters()
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 8
    assert params["slurm_partition"] == "gpu" and params["timeout_min"] == 4320
    ev = gpu.for_stage("evaluate")
    assert ev.gpus_per_node == 1 and ev.processes_per_node() == 1 and ev.partition == "gpu"


def test_overrides_are_checked_and_strings_converted():
    p = load_profile("local-ci", {"time_min": "120", "max_array_size": "8", "account": "lab"})
    assert (p.time_min, p.max_array_size, p.account) == (120, 8, "lab")
    assert p.resolved_max_array_size() == 8
    assert load_profile("local-ci", {"mem_gb": "null"}).mem_gb is None


@pytest.mark.parametrize("text, field", [
    ("partition: debug\ngpus: 2\n", "gpus"),
    ("time_min: soon\n", "time_min"),
    ("nodes: 0\n", "nodes"),
    ("gpus_per_node: true\n", "gpus_per_node"),
    ("stage_overrides: {train: {nodes: 1}}\n", "stage_overrides.train"),
    ("stage_overrides: {evaluate: {nodes: x}}\n", "stage_overrides.evaluate.nodes"),
    ("extra_sbatch: {'--bad': 1}\n", "extra_sbatch.--bad"),
])
def test_bad_profile_names_file_and_field(tmp_path, text, field):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ProfileError) as err:
        load_profile(f)
    assert err.value.path == str(f) and err.value.field == field
    assert str(f) in str(err.value) and field in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ProfileError, match="no such profile file.*local-ci"):
        load_profile("no-such-cluster")
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(f)
    with pytest.raises(ProfileError) as err:
        load_profile("local-ci", {"patition": "x"})
    assert err.value.field == "patition" and "(overrides)" in err.value.path


def test_max_array_size_falls_back_without_slurm(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert load_profile("local-ci").resolved_max_array_size() == 1000


def test_with_overrides_checks_like_the_file():
    base = load_profile("local-ci")
    p = base.with_overrides({"time_min": "30", "qos": "low"})
    assert (p.time_min, p.qos, p.source) == (30, "low", base.source) and base.qos is None
    with pytest.raises(ProfileError) as err:
        base.with_overrides({"nodes": 0})
    assert err.value.field == "nodes" and err.value.path == f"{base.source} (overrides)"
