"""Bad inputs to `shnet train` found before any work starts, and the public torchvision helper."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from shnet.cli import main


def test_train_refuses_a_bert_folder_without_weights_before_reading_anything(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
    result = CliRunner().invoke(main, [
        "train", "--cache", str(tmp_path / "no-cache"), "--captions", str(tmp_path / "no-captions.json"),
        "-o", str(tmp_path / "run"), "--text-encoder", "bert", "--bert-path", str(folder),
    ])
    assert result.exit_code == 1
    assert "is not a BERT model folder" in result.output and "config.json" in result.output and "weights" in result.output
    assert not (tmp_path / "run").exists()


def test_train_refuses_a_directory_that_is_not_a_cache(tmp_path):
    (tmp_path / "plain").mkdir()
    result = CliRunner().invoke(main, [
        "train", "--cache", str(tmp_path / "plain"), "--captions", str(tmp_path / "captions.csv"), "-o", str(tmp_path / "run"),
    ])
    assert result.exit_code == 1 and "is not a shnet cache" in result.output, result.output


def test_ensure_torchvision_is_public_and_makes_torchvision_ops_usable():
    script = (
        "import shnet, torch\n"
        "shnet.ensure_torchvision()\n"
        "import torchvision\n"
        "boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 11., 11.], [50., 50., 60., 60.]])\n"
        "print(torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 2]"
