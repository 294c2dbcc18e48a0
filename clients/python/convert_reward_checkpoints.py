#!/usr/bin/env python3
"""Convert released reward checkpoints into the safetensors layouts `--reward NAME=KIND:DIR` loads.

    aesthetic  sac+logos+ava1-l14-linearMSE.pth  OUT_DIR
        -> OUT_DIR/aesthetic.safetensors (keys layers.0/2/4/6/7.{weight,bias}, unchanged).
           Put a transformers CLIPModel folder of openai/clip-vit-large-patch14 (config.json,
           model.safetensors, preprocessor_config.json, tokenizer files) at OUT_DIR/clip/.
    hpsv2      HPS_v2.1_compressed.pt              OUT_DIR
        -> OUT_DIR/open_clip_model.safetensors (the open_clip state dict from ckpt['state_dict'],
           a leading 'module.' stripped) + OUT_DIR/open_clip_config.json (open_clip's ViT-H-14
           model_cfg + OpenAI mean/std). Copying open_clip's bpe_simple_vocab_16e6.txt.gz beside it
           is optional (the server embeds the same vocabulary).
    --self-check
        writes fake checkpoints with torch.save, converts them and reads the results back.

Safety: checkpoints are read only with torch.load(path, map_location="cpu", weights_only=True),
torch's restricted unpickler that accepts tensors and plain containers (dict/list/str/numbers) and
refuses any other object, so a malicious .pth/.pt cannot run code here. A torch too old to
support weights_only is refused rather than falling back to a full unpickle. Outputs are written
to a temporary file in the destination folder and renamed into place (atomic on POSIX).
"""
import argparse
import json
import os
import struct
import sys
import tempfile

VIT_H_14 = {
    "model_cfg": {
        "embed_dim": 1024,
        "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
    },
}
AESTHETIC_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.int64": "I64"}


def load_weights_only(path):
    import torch
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TypeError as e:  # torch without the weights_only argument
        raise SystemExit(f"{path}: this torch ({torch.__version__}) cannot load weights-only; refusing to unpickle ({e})")


def _atomic_write(dest, write):
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(dest))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors, dest):
    """Minimal safetensors writer (header JSON + raw little-endian data), no extra dependency."""
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = _DTYPES.get(str(t.dtype))
        if dtype is None:
            raise SystemExit(f"{name}: unsupported dtype {t.dtype}")
        data = t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)

    def write(f):
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)
    _atomic_write(dest, write)


def _tensor_dict(obj, path):
    import torch
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SystemExit(f"{path}: expected a state dict of tensors")
    return obj


def convert_aesthetic(src, out_dir):
    sd = _tensor_dict(load_weights_only(src), src)
    missing = [k for k in AESTHETIC_KEYS if k not in sd]
    if missing:
        raise SystemExit(f"{src}: not the improved-aesthetic-predictor MLP (missing {', '.join(missing)})")
    dest = os.path.join(out_dir, "aesthetic.safetensors")
    save_safetensors({k: sd[k].float() for k in AESTHETIC_KEYS}, dest)
    return dest


def convert_hpsv2(src, out_dir):
    ckpt = load_weights_only(src)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    sd = _tensor_dict(sd, src)
    sd = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
    if "visual.proj" not in sd or "token_embedding.weight" not in sd:
        raise SystemExit(f"{src}: not an open_clip CLIP state dict (no visual.proj / token_embedding.weight)")
    dest = os.path.join(out_dir, "open_clip_model.safetensors")
    save_safetensors(sd, dest)
    cfg = json.dumps(VIT_H_14, indent=2).encode()
    _atomic_write(os.path.join(out_dir, "open_clip_config.json"), lambda f: f.write(cfg))
    return dest


def _read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def self_check():
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        sizes = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
        aes = {}
        for (i, (o, n)) in zip((0, 2, 4, 6, 7), sizes):
            aes[f"layers.{i}.weight"] = torch.randn(o, n, generator=g)
            aes[f"layers.{i}.bias"] = torch.randn(o, generator=g)
        torch.save(aes, os.path.join(tmp, "aes.pth"))
        out = convert_aesthetic(os.path.join(tmp, "aes.pth"), os.path.join(tmp, "aes"))
        h = _read_header(out)
        assert sorted(h) == sorted(AESTHETIC_KEYS) and h["layers.0.weight"]["shape"] == [1024, 768], h
        with open(out, "rb") as f:
            f.seek(8 + struct.unpack("<Q", open(out, "rb").read(8))[0] + h["layers.7.bias"]["data_offsets"][0])
            got = struct.unpack("<f", f.read(4))[0]
        assert abs(got - aes["layers.7.bias"][0].item()) < 1e-7

        hps = {"module.visual.proj": torch.randn(4, 2), "module.token_embedding.weight": torch.randn(3, 4),
               "module.logit_scale": torch.tensor(4.6)}
        torch.save({"state_dict": hps, "epoch": 1}, os.path.join(tmp, "hps.pt"))
        out = convert_hpsv2(os.path.join(tmp, "hps.pt"), os.path.join(tmp, "hps"))
        h = _read_header(out)
        assert sorted(h) == ["logit_scale", "token_embedding.weight", "visual.proj"] and h["logit_scale"]["shape"] == [], h
        assert os.path.exists(os.path.join(tmp, "hps", "open_clip_config.json"))

        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))
        torch.save({"x": Evil()}, os.path.join(tmp, "evil.pt"))
        try:
            load_weights_only(os.path.join(tmp, "evil.pt"))
            raise AssertionError("an arbitrary object was unpickled")
        except Exception as e:  # UnpicklingError (or SystemExit from an old torch)
            assert not isinstance(e, AssertionError)
        except SystemExit:
            pass
    print("self-check ok: aesthetic + hpsv2 conversions, weights_only refuses objects")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", nargs="?", choices=["aesthetic", "hpsv2"])
    p.add_argument("src", nargs="?")
    p.add_argument("out_dir", nargs="?")
    p.add_argument("--self-check", action="store_true")
    a = p.parse_args(argv)
    if a.self_check:
        self_check()
        return 0
    if not (a.kind and a.src and a.out_dir):
        p.error("give KIND SRC OUT_DIR, or --self-check")
    dest = (convert_aesthetic if a.kind == "aesthetic" else convert_hpsv2)(a.src, a.out_dir)
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
