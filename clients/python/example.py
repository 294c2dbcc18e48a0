"""python3 example.py [HOST:PORT] — generates two images and saves them with their prior noise."""

import sys

import numpy as np

from realalign import RealAlignClient

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
with RealAlignClient(target) as client:
    print([b.name for b in client.list_backbones()])
    samples = client.generate("a photo of a cat wearing a tiny hat", num_images=2, seeds=[1, 2], steps=8,
                              on_progress=lambda p: print(f"step {p.step}/{p.total_steps}", end="\r"))
    for s in samples:
        open(f"sample_{s.index}.png", "wb").write(s.png)
        np.save(f"sample_{s.index}_prior_noise.npy", s.prior_noise)
        print(f"sample {s.index}: seed {s.seed}, x_T {s.prior_noise.shape} {s.prior_noise.dtype}")
