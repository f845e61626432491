import importlib.metadata
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

import auxtl
from auxtl import cli, models, registry
from auxtl.errors import AuxtlWarning

FLIP_TASK = textwrap.dedent('''
    """Horizontal-flip prediction, written against auxtl's public API only."""
    import dataclasses
    import jax, jax.numpy as jnp
    from flax import nnx
    import auxtl

    @auxtl.register_task("{name}")
    @dataclasses.dataclass(frozen=True)
    class HorizontalFlip(auxtl.TaskBase):
        summary = "predict whether the image was mirrored left-right"
        predicts = "2-way class"

        def make_examples(self, key, images):
            flipped = images[:, :, ::-1, :]
            inputs = jnp.concatenate([images, flipped])
            labels = jnp.repeat(jnp.arange(2, dtype=jnp.int32), images.shape[0])
            return inputs, labels

        def make_head(self, feature_dim, *, image_shape, rngs):
            return nnx.Linear(feature_dim, 2, rngs=rngs)

        def loss_and_metrics(self, logits, labels):
            return auxtl.losses.classification(logits, labels)
''')


def write_flip_task(tmp_path, name="hflip"):
    path = tmp_path / f"{name}_task.py"
    path.write_text(FLIP_TASK.format(name=name))
    return path


def test_rotation_is_built_in():
    assert "rotation" in auxtl.list_tasks()
    assert auxtl.task_class("rotation").summary


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(KeyError, match=r"unknown task 'nope'.*rotation"):
        auxtl.get_task("nope")


def test_bad_parameters_name_the_task():
    with pytest.raises(TypeError, match="rotation"):
        auxtl.get_task("rotation", spin=3)


def test_duplicate_names_raise():
    with pytest.raises(ValueError, match="already registered"):
        @auxtl.register_task("rotation")
        class Impostor(auxtl.TaskBase):
            pass


def test_task_module_file_registers_a_task(tmp_path):
    auxtl.load_task_module(write_flip_task(tmp_path, "hflip_file"))
    task = auxtl.get_task("hflip_file")
    assert isinstance(task, auxtl.Task)
    assert "hflip_file" in auxtl.list_tasks()


def test_missing_task_module_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.py"):
        auxtl.load_task_module(tmp_path / "nothere.py")


@pytest.mark.slow
def test_entry_point_plugin_from_an_installed_package(tmp_path):
    """A tiny package declaring the `auxtl.tasks` entry point is installed and its task trains."""
    pkg = tmp_path / "pkg"
    (pkg / "auxtl_hflip").mkdir(parents=True)
    (pkg / "auxtl_hflip" / "__init__.py").write_text(FLIP_TASK.format(name="hflip_ep"))
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=69"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "auxtl-hflip"
        version = "0.0.1"
        [project.entry-points."auxtl.tasks"]
        hflip_ep = "auxtl_hflip"
        [tool.setuptools]
        packages = ["auxtl_hflip"]
    '''))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(pkg)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site)}
    cli = [sys.executable, "-m", "auxtl.cli"]
    listed = subprocess.run(cli + ["tasks"], env=env, capture_output=True, text=True, check=True)
    assert "hflip_ep" in listed.stdout and "rotation" in listed.stdout
    out = tmp_path / "run"
    trained = subprocess.run(
        cli + ["pretrain", "--task", "hflip_ep", "--data", "digits", "--steps", "4",
               "--batch-size", "16", "--log-every", "2", "--model-arg", "widths=[8,8,8,8,8]",
               "--model-arg", "fc_dim=8", "--out", str(out), "--no-progress"],
        env=env, capture_output=True, text=True)
    assert trained.returncode == 0, trained.stderr
    assert "held-out hflip_ep accuracy" in trained.stdout
    assert (out / "trunk" / "metadata").exists()


def test_a_task_class_missing_a_method_is_refused_at_registration():
    with pytest.raises(auxtl.errors.BadParameterError) as caught:
        @auxtl.register_task("no_loss")
        class NoLoss(auxtl.TaskBase):
            def make_examples(self, key, images):
                return images, images

            def make_head(self, feature_dim, *, image_shape, rngs):
                return None
    message = str(caught.value)
    assert "no_loss" in message and "NoLoss" in message and "loss_and_metrics" in message
    assert "no_loss" not in auxtl.list_tasks()


def test_without_task_base_every_missing_method_is_named():
    with pytest.raises(TypeError) as caught:
        @auxtl.register_task("bare_task")
        class Bare:
            def make_examples(self, key, images):
                return images, images
    message = str(caught.value)
    for method in ("make_head", "loss_and_metrics", "forward", "validate"):
        assert method in message
    assert "Bare" in message and "auxtl.TaskBase" in message


def test_a_method_that_cannot_take_auxtls_arguments_is_named():
    with pytest.raises(TypeError, match=r"make_examples\(images\) cannot be called as "
                                        r"make_examples\(key, images\)"):
        @auxtl.register_task("one_arg")
        class OneArg(auxtl.TaskBase):
            def make_examples(self, images):
                return images, images

            def make_head(self, feature_dim, *, image_shape, rngs):
                return None

            def loss_and_metrics(self, outputs, targets):
                return 0.0, {}


def test_a_complete_task_without_task_base_is_accepted():
    @auxtl.register_task("standalone_flip")
    class Standalone:
        def validate(self, image_shape):
            pass

        def make_examples(self, key, images):
            return images, images

        def make_head(self, feature_dim, *, image_shape, rngs):
            return None

        def forward(self, trunk, head, inputs, *, train, frozen=()):
            return inputs

        @staticmethod
        def loss_and_metrics(outputs, targets):
            return 0.0, {}

    assert auxtl.task_class("standalone_flip") is Standalone
    assert isinstance(auxtl.get_task("standalone_flip"), auxtl.Task)


PLUGIN_MODEL = textwrap.dedent('''
    import dataclasses
    import auxtl

    @dataclasses.dataclass(frozen=True)
    class Config:
        in_channels: int = 1

    @auxtl.register_model("{name}", Config)
    def build(config, *, rngs):
        raise NotImplementedError  # registered, never built here
''')


def fake_entry_points(monkeypatch, tmp_path, group, good_name, good_text):
    """`importlib.metadata.entry_points(group=...)` answering `group` with a broken plugin
    (its module does not exist) listed before a good one (a module file in tmp_path)."""
    module = f"auxtl_fake_plugin_{good_name}"
    (tmp_path / f"{module}.py").write_text(good_text)
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = [importlib.metadata.EntryPoint("broken", "auxtl_no_such_plugin_module", group),
               importlib.metadata.EntryPoint(good_name, module, group)]
    real = importlib.metadata.entry_points

    def entry_points(**selection):
        return entries if selection == {"group": group} else real(**selection)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    monkeypatch.delitem(sys.modules, module, raising=False)


@pytest.mark.parametrize("kind", ["task", "model"])
def test_a_broken_plugin_is_a_warning_and_the_others_load(kind, monkeypatch, tmp_path):
    name = f"{kind}_plugin_ok"
    if kind == "task":
        fake_entry_points(monkeypatch, tmp_path, "auxtl.tasks", name, FLIP_TASK.format(name=name))
        owner, table, listing = registry, registry._REGISTRY, auxtl.list_tasks
    else:
        fake_entry_points(monkeypatch, tmp_path, "auxtl.models", name,
                          PLUGIN_MODEL.format(name=name))
        owner, table, listing = models, models.MODELS, auxtl.list_models
    monkeypatch.setattr(owner, "_PLUGINS_LOADED", False)
    try:
        with pytest.warns(AuxtlWarning) as caught:
            assert name in listing()
        [warning] = caught
        message = str(warning.message)
        assert f"{kind} plugin 'broken' (auxtl_no_such_plugin_module, entry point group " \
               f"'auxtl.{kind}s')" in message
        assert "ModuleNotFoundError: No module named 'auxtl_no_such_plugin_module'" in message
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # loaded once: the second call warns no more
            assert name in listing()
    finally:
        table.pop(name, None)


def test_the_cli_prints_a_broken_plugin_as_one_warning_line(monkeypatch, tmp_path, capsys):
    fake_entry_points(monkeypatch, tmp_path, "auxtl.models", "cli_plugin_ok",
                      PLUGIN_MODEL.format(name="cli_plugin_ok"))
    monkeypatch.setattr(models, "_PLUGINS_LOADED", False)
    try:
        assert cli.main(["models"]) == 0
    finally:
        models.MODELS.pop("cli_plugin_ok", None)
    out, err = capsys.readouterr()
    assert "cli_plugin_ok" in out.split() and "small_cnn" in out.split()
    assert err.startswith("auxtl: warning: skipped the model plugin 'broken' ")
    assert len(err.splitlines()) == 1, err
