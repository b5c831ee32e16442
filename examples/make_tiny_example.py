"""Write a tiny Hunyuan-Video-shaped porting example (source and target base models, and a
kohya/Musubi-style LoRA, all a few hundred KB) into a folder, for the README's first command:

    python examples/make_tiny_example.py tiny
    loraport port tiny/lora.safetensors --source tiny/source.safetensors \
        --target tiny/target.safetensors -o tiny/ported.safetensors
"""

import argparse

from loraport.testing.tiny import write_example

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", nargs="?", default="tiny")
    p.add_argument("--arch", default="hunyuan-video", choices=("hunyuan-video", "flux", "wan", "sd15", "sdxl", "llama"))
    args = p.parse_args()
    for what, path in write_example(args.folder, args.arch).items():
        print(f"{what}: {path}")
