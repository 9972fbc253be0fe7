import jax
import numpy as np
import pytest
from jax.sharding import AxisType

import jaxpar
from jaxpar.core.mesh import MeshSpec, draw_mesh, layout_names, make_mesh, parse_mesh


@pytest.mark.parametrize(
    "text, shape",
    [
        ("2x2", (1, 2, 1, 2)),
        ("4x1", (1, 4, 1, 1)),
        ("1x8", (1, 1, 1, 8)),
        ("8", (1, 8, 1, 1)),
        ("data=2,fsdp=2,model=2", (1, 2, 2, 2)),
        ("fsdp=8", (1, 1, 8, 1)),
        (" model=4 , data=2 ", (1, 2, 1, 4)),
        ("stage=2,data=2", (2, 2, 1, 1)),
        ("stage=2,fsdp=2,model=2", (2, 1, 2, 2)),
        ("stage=8", (8, 1, 1, 1)),
        ("cpu8", (1, 2, 2, 2)),
        ("cpu8-pipeline", (2, 2, 2, 1)),
        ("laptop4", (1, 2, 1, 2)),
        ("gpu8-fsdp", (1, 1, 8, 1)),
    ],
)
def test_grammar(text, shape):
    assert parse_mesh(text).shape == shape


def test_no_mesh_puts_every_device_on_data():
    assert parse_mesh(None, device_count=8) == MeshSpec(data=8)


def test_layout_by_path(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('description = "two by four"\ndata = 2\nmodel = 4\n')
    assert parse_mesh(str(path)) == MeshSpec(data=2, model=4)


@pytest.mark.parametrize(
    "text, words",
    [
        ("2x", "invalid mesh '2x'"),
        ("0x4", "positive integer"),
        ("abc", "unknown mesh layout 'abc'"),
        ("data=2,foo=2", "unknown axis 'foo'"),
        ("data=2,data=4", "given twice"),
        ("data=-1", "not axis=size"),
        ("nope.toml", "does not exist"),
    ],
)
def test_bad_specs(text, words):
    with pytest.raises(jaxpar.UserError, match=words):
        parse_mesh(text)


def test_bad_layout_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("data = 2\nexpert = 2\n")
    with pytest.raises(jaxpar.UserError, match="unknown axis 'expert'"):
        parse_mesh(str(path))


def test_every_layout_parses():
    assert len(layout_names()) >= 3
    for name in layout_names():
        assert parse_mesh(name).size >= 1


def test_make_mesh_pins_auto_axes_and_uses_subset():
    mesh = make_mesh(parse_mesh("2x2"))
    assert mesh.axis_names == ("stage", "data", "fsdp", "model")
    assert dict(mesh.shape) == {"stage": 1, "data": 2, "fsdp": 1, "model": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sorted(d.id for d in mesh.devices.flat) == [0, 1, 2, 3]


def test_mesh_larger_than_devices_is_refused():
    with pytest.raises(jaxpar.UserError, match="needs 16 devices but this job has 8 cpu"):
        make_mesh(parse_mesh("16"))


@pytest.mark.parametrize("text", ["data=2,fsdp=2,model=2", "stage=2,data=2,model=2"])
def test_draw_mesh_shows_every_device_at_its_coordinates(text):
    mesh = make_mesh(parse_mesh(text))
    picture = draw_mesh(mesh)
    lines = picture.splitlines()
    sizes = " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
    assert lines[0] == f"mesh {sizes} (8 cpu devices)"
    assert sizes.startswith("stage=")  # every mesh has all four axes, stage outermost
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert len(rows) == 8 // mesh.shape["model"]
    for (s, d, f, m), device in np.ndenumerate(mesh.devices):
        assert rows[f"{s},{d},{f}"][m] == str(device.id)


def test_request_devices_after_start_keeps_devices():
    jaxpar.request_devices(4)
    assert jax.device_count() == 8


def test_batch_is_checked_from_the_sizes_alone():
    from jaxpar.core.mesh import check_batch_spec

    check_batch_spec(128, parse_mesh("data=2,fsdp=2,model=2"))
    check_batch_spec(3, parse_mesh("1x8"))  # model does not split the batch
    with pytest.raises(jaxpar.UserError, match="not divisible by the 3 batch shards"):
        check_batch_spec(128, parse_mesh("3x1"))
    with pytest.raises(jaxpar.UserError, match=r"the 24 batch shards \(stage x data x fsdp\)"):
        check_batch_spec(128, parse_mesh("data=3,fsdp=8,model=2"))


@pytest.fixture
def platforms():
    """Set ``jax_platforms`` for a test (read only when a backend starts: ours is up)."""
    before = jax.config.jax_platforms
    yield lambda value: jax.config.update("jax_platforms", value)
    jax.config.update("jax_platforms", before)


def test_emulated_cpu_devices_are_capped_only_where_the_cpu_computes(platforms, monkeypatch):
    import jaxpar.core.mesh as mesh

    assert mesh.MAX_CPU_DEVICES >= 64  # docs/runs.md's dry run of ResNet-50 on fsdp=64
    jaxpar.request_devices(mesh.MAX_CPU_DEVICES)
    with pytest.raises(jaxpar.UserError, match="at most 2048 CPU devices are emulated"):
        jaxpar.request_devices(mesh.MAX_CPU_DEVICES + 1)
    platforms("cuda,cpu")  # JAX_PLATFORMS picks an accelerator: the CPU count does not matter
    jaxpar.request_devices(20_000)
    platforms(None)  # unset: the installed plugins decide
    monkeypatch.setattr(mesh, "_installed", lambda name: False)
    monkeypatch.setattr(mesh.importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(jaxpar.UserError, match="python -m jaxpar.launch -n 10 --"):
        jaxpar.request_devices(20_000)
    monkeypatch.setattr(mesh, "_installed", lambda name: name == "jax_cuda12_plugin")
    jaxpar.request_devices(20_000)
    assert jax.device_count() == 8


def test_multi_host_layout_in_one_process_points_to_the_launcher():
    with pytest.raises(jaxpar.UserError, match="python -m jaxpar.launch -n 2 -- python train.py"):
        make_mesh(parse_mesh("hosts2-hybrid"))


def test_a_large_mesh_is_drawn_in_summary():
    """A 2,048-device mesh once printed 2,048 rows: past `most`, the first and last few."""
    rows = draw_mesh(make_mesh(parse_mesh("8")), most=4).splitlines()
    assert len(rows) == 2 + 5 and rows[4].split() == ["...", "(4", "rows", "more)"]
    assert [r.split()[-1] for r in rows[2:]] == ["0", "1", "more)", "6", "7"]
    columns = draw_mesh(make_mesh(parse_mesh("1x8")), most=4).splitlines()[1].split()
    assert columns[1:] == ["model=0", "model=1", "...", "model=6", "model=7"]
