"""The README's example runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    example = next(b for b in blocks if "inject(" in b)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert (tmp_path / "reviews-lora.safetensors").exists()
    from pefttutor import adapter_layers
    assert not adapter_layers(namespace["model"])          # unload left a plain model
