"""The PyTorch side of InstructPix2Pix: making training data.

captions -> instructions (an LLM writes an instruction and an edited caption)
         -> pairs (Stable Diffusion + Prompt-to-Prompt renders before/after, CLIP filters)
         -> the original release's folder layout -> `ip2p datagen import original` -> TFDS.
"""
