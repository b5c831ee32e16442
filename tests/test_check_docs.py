"""scripts/check_docs.py, the CI step that runs every documented command: how it reads Markdown
and shell lines, what it substitutes, and when it says the README's numbers about the suite are
wrong. (Running the commands is CI's job; these check the parts that decide what runs.)"""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts" / "check_docs.py")
check_docs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_docs)


def test_blocks_and_shell_lines(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n```bash\nloraport port a.safetensors \\\n    -o out.safetensors  # a comment\n\n"
        "echo '# not a comment'\n```\n```python\nprint(1)\n```\n```\nplain\n```\n"
    )
    found = list(check_docs.blocks(str(doc)))
    assert [lang for lang, _, _ in found] == ["bash", "python", "text"]
    commands = list(check_docs.shell_commands(found[0][2]))
    assert commands == [
        ("loraport port a.safetensors      -o out.safetensors", "a comment"),
        ("echo '# not a comment'", ""),
    ]


def test_user_files_become_the_bundled_example_and_outputs_go_aside():
    cmd = "loraport merge a.safetensors:0.7 b.safetensors -o merged.safetensors --report r.json"
    assert check_docs.substitute(cmd) == (
        "loraport merge examples/out/lora.safetensors:0.7 examples/out/ported.safetensors "
        "-o examples/out/docs/merged.safetensors --report examples/out/docs/r.json"
    )
    # paths with a folder are the docs' own (the bundled example, a config) and stay as written
    assert check_docs.substitute("cat examples/out/report.json") == "cat examples/out/report.json"


@pytest.mark.parametrize("comment, skipped", [("needs a GPU: CUDA tests", True), ("on an NVIDIA GPU", False), ("", False)])
def test_only_a_gpu_need_leaves_a_command_out(comment, skipped):
    assert any(rx.search(comment) for rx in check_docs.NOT_RUN.values()) == skipped


SUMMARY = "======= 400 passed, 40 skipped, 2 warnings in 250.31s (0:04:10) =======\n"


@pytest.mark.parametrize(
    "readme, output, seconds, problems",
    [
        ("It runs 442 tests in about 4 minutes.", SUMMARY, 250.0, 0),
        ("It runs 442 tests in about 4 minutes.", SUMMARY, 600.0, 1),  # 10 min is not "about 4"
        ("It runs 300 tests in about 4 minutes.", SUMMARY, 250.0, 1),  # 440 ran
        ("It runs fast.", SUMMARY, 250.0, 1),  # the README stopped saying it
        ("It runs 442 tests in about 4 minutes.", "no summary\n", 250.0, 1),
    ],
)
def test_the_readme_must_state_the_suite_and_agree_with_the_run(readme, output, seconds, problems):
    assert len(check_docs.check_suite_claim(readme, output, seconds)) == problems


def test_the_repository_readme_states_the_suite_and_shows_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert check_docs.SUITE_CLAIM.search(readme)
    commands = [c for lang, _, text in check_docs.blocks(str(ROOT / "README.md")) if lang == "bash"
                for c, _ in check_docs.shell_commands(text)]  # fmt: skip
    assert commands[:2] == ["bash scripts/setup.sh", ".venv/bin/python -m pytest"]
