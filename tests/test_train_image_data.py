"""`hfpatch train llava --data x.jsonl` and `hfpatch train flux --data dir/`: the readers' samples against
independent references, short runs with finite losses, and bad inputs as one `error:` line."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hfpatch.train import flux_data, llava_data
from hfpatch.train.tokenizer import tokenizer_from_json, train_bpe
from test_train_common import cli, cli_ok, losses, train_env  # noqa: F401

SMALL = ["--seq-len", "64", "--micro-num", "2", "--steps", "2"]
# the manifest's tiny LLaVA: 28 x 28 images, 4 image tokens each
IMAGE_SIZE, IMAGE_TOKENS, IMAGE_TOKEN = 28, 4, 999
# LLaVA-1.5's pad colour (the CLIP mean x 255, truncated) and CLIP's mean / std
PAD_RGB = (122, 116, 104)
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
# the tiny Flux: in_channels 4 (1 latent channel x 2 x 2), joint_attention_dim 16, pooled_projection_dim 8
FLUX = {"in_channels": 4, "joint_attention_dim": 16, "pooled_projection_dim": 8}


def _png(path, width, height, mode="RGB", seed=0):
    """A noisy image, so resizing and padding show in every pixel."""
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def _jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def llava_dir(tmp_path):
    """Three images of different shapes (one grey), one of them outside the jsonl's folder, and four lines."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    _png(data / "img" / "wide.png", 40, 20, seed=1)
    _png(data / "img" / "tall.png", 10, 30, seed=2)
    grey = _png(tmp_path / "grey.png", 28, 28, mode="L", seed=3)
    _jsonl(data / "train.jsonl", [
        {"image": "img/wide.png", "text": "a wide picture"},
        {"images": ["img/tall.png", str(grey)], "text": "first <image> then <image> done"},
        {"text": "only words here"},
        {"images": ["img/tall.png"], "text": "<image> tall again"},
    ])
    return data


def _reference_pixels(path):
    """LLaVA-1.5 preprocessing with numpy: centre on a square of the pad colour, bicubic resize, normalize."""
    image = np.asarray(Image.open(path).convert("RGB"))
    height, width, _ = image.shape
    side = max(height, width)
    square = np.empty((side, side, 3), np.uint8)
    square[...] = PAD_RGB
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = image
    resized = np.asarray(Image.fromarray(square).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float64)
    return torch.from_numpy(((resized / 255 - MEAN) / STD).transpose(2, 0, 1).copy()).float()


def test_llava_reader_layout_and_preprocessing(llava_dir, tmp_path):
    tokenizer = tokenizer_from_json(train_bpe(["a wide picture first then done only words here tall again"] * 4, 300))
    records = llava_data.read_records(llava_dir)
    samples = llava_data.build_samples(records, tokenizer, image_token_id=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS,
                                       image_size=IMAGE_SIZE)

    def text(piece):
        return tokenizer.hf(piece, add_special_tokens=False)["input_ids"]

    image, eos = [IMAGE_TOKEN] * IMAGE_TOKENS, [tokenizer.eos_id]
    assert [s.input_ids for s in samples] == [
        image + text("a wide picture") + eos,  # no placeholder: the image first
        text("first ") + image + text(" then ") + image + text(" done") + eos,
        text("only words here") + eos,
        image + text(" tall again") + eos,
    ]
    assert [None if s.pixel_values is None else tuple(s.pixel_values.shape) for s in samples] == [
        (1, 3, 28, 28), (2, 3, 28, 28), None, (1, 3, 28, 28)]
    img = llava_dir / "img"
    torch.testing.assert_close(samples[0].pixel_values[0], _reference_pixels(img / "wide.png"), atol=1e-5, rtol=0)
    torch.testing.assert_close(samples[1].pixel_values[0], _reference_pixels(img / "tall.png"), atol=1e-5, rtol=0)
    torch.testing.assert_close(samples[1].pixel_values[1], _reference_pixels(tmp_path / "grey.png"), atol=1e-5, rtol=0)
    # the pad bands of the wide image are the pad colour, normalized
    band = (np.array(PAD_RGB) / 255 - MEAN) / STD
    torch.testing.assert_close(samples[0].pixel_values[0][:, 0, :], torch.tensor(band).float()[:, None].expand(3, 28),
                               atol=1e-5, rtol=0)


def test_llava_reader_keeps_a_tokenizers_bos_first(llava_dir):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from hfpatch.train.tokenizer import TextTokenizer

    base = tokenizer_from_json(train_bpe(["a wide picture <s>"] * 4, 300)).hf.backend_tokenizer
    bos = base.token_to_id("<|pad|>")  # any special token will do as BOS
    base.post_processor = processors.TemplateProcessing(single="<|pad|> $A", special_tokens=[("<|pad|>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=base, bos_token="<|pad|>", eos_token="<|endoftext|>")
    tokenizer = TextTokenizer(hf, "test")
    record = llava_data.read_records(llava_dir)[0]
    ids = llava_data.encode(record, tokenizer, IMAGE_TOKEN, IMAGE_TOKENS)
    assert ids[:1 + IMAGE_TOKENS] == [bos] + [IMAGE_TOKEN] * IMAGE_TOKENS and ids.count(bos) == 1


def test_llava_trains_on_a_jsonl(train_env, llava_dir, tmp_path):
    result = cli_ok("llava", "--data", llava_dir / "train.jsonl", *SMALL, "--out", tmp_path / "run")
    assert f"data: {llava_dir / 'train.jsonl'}: 4 documents" in result.output
    # embedded BPE (1024) + the image token
    assert "vocab 1025" in result.output
    curve = losses(tmp_path / "run")
    assert len(curve) == 2 and all(math.isfinite(x) and x > 0 for x in curve)


def test_llava_fine_tunes_a_checkpoint_and_exports_it(train_env, llava_dir, tmp_path):
    """--model-path loads a LLaVA checkpoint (its own tokenizer, an image token inside the tokenizer's
    range as llava-hf has it); --export writes what stock transformers loads. With lr 0 the exported
    weights are the checkpoint's, bit for bit: proof that both ends read and write the real tensors."""
    from transformers import LlavaForConditionalGeneration
    from safetensors.torch import load_file

    from hfpatch import modeling, zoo

    tokenizer = tokenizer_from_json(train_bpe(["a wide picture first then done only words here tall again"] * 4, 300))
    tokenizer.hf.add_special_tokens({"additional_special_tokens": ["<image>"]})  # llava-hf's layout
    image_token = tokenizer.hf.convert_tokens_to_ids("<image>")
    entry = zoo.resolve("llava")
    text = {**entry.test_config["text_config"], "vocab_size": tokenizer.vocab_size}
    config = modeling.tiny_config(entry, text_config=text, image_token_index=image_token)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / "ckpt")
    tokenizer.save(tmp_path / "ckpt")
    common = ["--model-path", tmp_path / "ckpt", "--data", llava_dir / "train.jsonl", *SMALL]
    cli_ok("llava", *common, "--lr", "0", "--out", tmp_path / "frozen", "--export", tmp_path / "hf")
    exported, original = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ckpt" / "model.safetensors")
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name
    assert LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").config.image_token_index == image_token
    cli_ok("llava", *common, "--out", tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert len(curve) == 2 and all(math.isfinite(x) and x > 0 for x in curve)


def test_flux_fine_tunes_a_checkpoint_and_exports_it(train_env, tmp_path):
    """--model-path reads a diffusers transformer dir; --export writes one stock diffusers loads. With lr 0 the
    exported weights are the checkpoint's, bit for bit."""
    import diffusers
    from safetensors.torch import load_file

    from hfpatch import modeling, zoo

    torch.manual_seed(0)
    diffusers.FluxTransformer2DModel.from_config(modeling.tiny_config(zoo.resolve("flux"))).save_pretrained(tmp_path / "ckpt")
    weights = "diffusion_pytorch_model.safetensors"
    cli_ok("flux", "--model-path", tmp_path / "ckpt", *SMALL, "--lr", "0", "--out", tmp_path / "frozen", "--export", tmp_path / "hf")
    exported, original = load_file(tmp_path / "hf" / weights), load_file(tmp_path / "ckpt" / weights)
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name
    assert diffusers.FluxTransformer2DModel.from_pretrained(tmp_path / "hf").config.num_layers == 1
    cli_ok("flux", "--model-path", tmp_path / "ckpt", *SMALL, "--out", tmp_path / "run")
    curve = losses(tmp_path / "run")
    assert len(curve) == 2 and all(math.isfinite(x) and x > 0 for x in curve)


def _flux_sample(path, latents, text_tokens=3, text_dim=16, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return flux_data.save_sample(path, latents, torch.randn(text_tokens, text_dim, generator=generator),
                                 torch.randn(8, generator=generator), **kwargs)


def test_pack_2x2_matches_an_explicit_loop():
    latents = torch.arange(3 * 4 * 6, dtype=torch.float32).view(3, 4, 6)
    expected = torch.empty(2 * 3, 3 * 4)
    for i in range(2):
        for j in range(3):
            expected[i * 3 + j] = torch.tensor([latents[c, 2 * i + dh, 2 * j + dw].item()
                                                for c in range(3) for dh in range(2) for dw in range(2)])
    assert torch.equal(flux_data.pack_2x2(latents), expected)


def test_flux_reader(tmp_path):
    generator = torch.Generator().manual_seed(0)
    square = torch.randn(1, 4, 4, generator=generator)
    wide = torch.randn(1, 1, 4, 8, generator=generator)  # as the pipeline returns it: a batch of one
    packed = torch.randn(6, 4, generator=generator).to(torch.bfloat16)
    _flux_sample(tmp_path / "b.safetensors", wide, text_tokens=5)
    _flux_sample(tmp_path / "a.safetensors", square)
    _flux_sample(tmp_path / "c.safetensors", packed, latent_hw=(3, 2))
    a, b, c = flux_data.read_latents(tmp_path, FLUX, seq_len=64)  # in name order
    assert [(s.height, s.width, s.encoder_hidden_states.shape[0]) for s in (a, b, c)] == [(2, 2, 3), (2, 4, 5), (3, 2, 3)]
    # token (i, j) of a 1-channel latent is its 2x2 block, row by row
    assert torch.equal(a.x0[1], square[0, 0:2, 2:4].flatten())
    assert torch.equal(b.x0[7], wide[0, 0, 2:4, 6:8].flatten())
    assert torch.equal(c.x0, packed.float())
    assert all(t.dtype == torch.float32 for s in (a, b, c) for t in (s.x0, s.encoder_hidden_states, s.pooled_projections))


def test_flux_trains_on_a_dir(train_env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    _flux_sample(data / "0.safetensors", torch.randn(1, 4, 4, generator=generator))
    _flux_sample(data / "1.safetensors", torch.randn(1, 6, 8, generator=generator), text_tokens=7)
    _flux_sample(data / "2.safetensors", torch.randn(6, 4, generator=generator), latent_hw=(2, 3))
    result = cli_ok("flux", "--data", data, *SMALL, "--out", tmp_path / "run")
    assert f"data: {data}: 3 documents" in result.output
    curve = losses(tmp_path / "run")
    assert len(curve) == 2 and all(math.isfinite(x) and x > 0 for x in curve)


def _llava_case(records, files=()):
    def make(t):
        for name in files:
            if name.endswith(".png"):
                _png(t / name, 20, 20)
            else:
                (t / name).write_text("not an image")
        return ["llava", "--data", _jsonl(t / "bad.jsonl", records)]
    return make


def _flux_case(latents, drop=None, **kwargs):
    def make(t):
        (t / "data").mkdir()
        path = _flux_sample(t / "data" / "0.safetensors", latents, **kwargs)
        if drop:
            from safetensors.torch import load_file, save_file
            tensors = load_file(str(path))
            del tensors[drop]
            save_file(tensors, str(path))
        return ["flux", "--data", t / "data"]
    return make


BAD = {
    "llava data missing": (lambda t: ["llava", "--data", t / "none.jsonl"], "none.jsonl does not exist"),
    "llava empty data": (_llava_case([]), "no samples in"),
    "llava bad json": (_llava_case([{"image": "a.png", "text": "x"}, '{"text": '], ["a.png"]), "bad.jsonl line 2 is not valid JSON"),
    "llava no text": (_llava_case([{"image": "a.png"}], ["a.png"]), "bad.jsonl line 1 has no 'text' field"),
    "llava image missing": (_llava_case([{"image": "gone.png", "text": "x"}]), "bad.jsonl line 1: image"),
    "llava not an image": (_llava_case([{"text": "x"}, {"image": "fake.jpg", "text": "x"}], ["fake.jpg"]),
                           "bad.jsonl line 2: cannot read image"),
    "llava placeholder count": (_llava_case([{"image": "a.png", "text": "<image> and <image>"}], ["a.png"]),
                                "bad.jsonl line 1: the text has 2 <image> placeholders but the line names 1 images"),
    "llava too long": (_llava_case([{"images": ["a.png"] * 20, "text": "x"}], ["a.png"]), "more than seq_len=64"),
    "llava export of synthetic data": (lambda t: ["llava", "--export", t / "hf"], "--export needs --data for llava"),
    "llava checkpoint with synthetic data": (lambda t: ["llava", "--model-path", t], "--model-path needs --data for llava"),
    "flux checkpoint dir without a config": (lambda t: ["flux", "--model-path", t], "is not a diffusers model dir (no config.json)"),
    "flux settings beside a checkpoint": (lambda t: ["flux", "--model-path", t, "--set", "model.num_layers=2"],
                                         "model.* settings are not taken with --model-path for flux"),
    "flux tokenizer": (lambda t: ["flux", "--tokenizer", t], "--tokenizer is not supported for flux"),
    "flux channels": (_flux_case(torch.randn(2, 4, 4)), "0.safetensors: 'latents' have 2 channels; the model's in_channels=4"),
    "flux odd height": (_flux_case(torch.randn(1, 5, 4)), "0.safetensors: 'latents' are 5 x 4; H and W must be even"),
    "flux missing key": (_flux_case(torch.randn(1, 4, 4), drop="pooled_prompt_embeds"),
                         "0.safetensors has no 'pooled_prompt_embeds' tensor"),
    "flux packed grid": (_flux_case(torch.randn(6, 4), latent_hw=(2, 2)), "packed 'latents' have shape [6, 4], expected [2 * 2, 4]"),
    "flux text width": (_flux_case(torch.randn(1, 4, 4), text_dim=15), "'prompt_embeds' has shape [3, 15], expected [tokens, 16]"),
    "flux too long": (_flux_case(torch.randn(1, 16, 16)), "has 67 tokens (3 text + 64 image), more than seq_len=64"),
    "flux no files": (lambda t: ["flux", "--data", t], "holds no .safetensors files"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line(train_env, tmp_path, case):
    make_args, message = BAD[case]
    result = cli(*make_args(tmp_path), *SMALL, "--out", tmp_path / "run")
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
