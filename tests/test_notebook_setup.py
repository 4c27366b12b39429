import pytest

from medvqa_lib import notebook
from medvqa_lib.errors import ConfigError, UnknownNameError


def test_setup_prints_versions_device_and_profile(capsys):
    ctx = notebook.setup("smoke", seed=3, data_dir="synthetic", synthetic_image_size=None)
    out = capsys.readouterr().out
    assert ctx.profile.name == "smoke" and ctx.seed == 3 and ctx.device == "cpu"
    assert "torch" in out and "transformers" in out and "medvqa-lib" in out
    assert "device: cpu" in out and "seed: 3" in out
    assert "profile: smoke" in out and "data: the built-in synthetic data" in out


def test_setup_rejects_bad_profile_and_parameters():
    with pytest.raises(UnknownNameError, match="choose one of: cpu, gpu, smoke"):
        notebook.setup("fast")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        notebook.setup("cpu", batch_size=-4)


def test_setup_seeds_torch():
    import torch

    notebook.setup("smoke", seed=7)
    a = torch.rand(3)
    notebook.setup("smoke", seed=7)
    assert torch.equal(a, torch.rand(3))


def test_colab_without_gpu_warns(monkeypatch):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    with pytest.warns(UserWarning, match="Colab is running without a GPU"):
        notebook.setup("cpu")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_profile_without_cuda_warns():
    with pytest.warns(UserWarning, match="profile 'gpu' on a machine without CUDA"):
        notebook.setup("gpu")


def test_output_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_OUTPUT_DIR", str(tmp_path))
    path = notebook.output_dir("chapter")
    assert path == tmp_path / "chapter" and path.is_dir()


def test_output_dir_defaults_to_the_checkout_from_root_or_notebooks(tmp_path, monkeypatch):
    from medvqa_lib.notebook import output_dir

    monkeypatch.delenv("MEDVQA_OUTPUT_DIR", raising=False)
    (tmp_path / "book" / "notebooks").mkdir(parents=True)
    (tmp_path / "book" / "_config.yml").write_text("title: t\n")
    expected = tmp_path / "book" / "_build" / "results" / "ch"
    for cwd in (tmp_path / "book", tmp_path / "book" / "notebooks"):
        monkeypatch.chdir(cwd)
        assert output_dir("ch").resolve() == expected.resolve()
    monkeypatch.chdir(tmp_path)  # outside any checkout (e.g. Colab's /content)
    assert output_dir("ch").resolve() == (tmp_path / "_build" / "results" / "ch").resolve()


def test_setup_builds_the_run_context_once(fake_slake, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_OUTPUT_DIR", str(tmp_path / "out"))
    ctx = notebook.setup("smoke", data_dir=fake_slake, chapter="ch", overrides={"seeds": [1, 2]})
    assert ctx.data_root == fake_slake.resolve() and ctx.real and not ctx.hub
    assert ctx.out_dir == tmp_path / "out" / "ch" and ctx.out_dir.is_dir()
    assert ctx.profile.seeds == (1, 2)


def test_synthetic_data_ignores_the_environment(fake_data_root, monkeypatch):
    """``data_dir="synthetic"`` means no real data even when MEDVQA_DATA_DIR points at some."""
    monkeypatch.setenv("MEDVQA_DATA_DIR", str(fake_data_root))
    assert notebook.setup("smoke", data_dir=None).real  # the environment is the default ...
    ctx = notebook.setup("smoke", data_dir="synthetic")  # ... but "synthetic" wins over it
    assert ctx.data_root is None and not ctx.real
    from medvqa_lib.data.suite import chapter_suite

    assert list(chapter_suite(ctx)) == ["synthetic"]


def test_a_data_folder_without_datasets_runs_on_synthetic_data(tmp_path):
    ctx = notebook.setup("smoke", data_dir=tmp_path)
    assert ctx.data_root == tmp_path.resolve() and not ctx.real


def test_show_code_renders_the_function_source():
    from medvqa_lib.nn import itc_loss

    shown = notebook.show_code(itc_loss)
    assert "medvqa_lib.nn.contrastive.itc_loss" in shown.data
    assert "```python\ndef itc_loss(" in shown.data
