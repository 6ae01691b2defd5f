"""Render docs/merging.png: skimage's astronaut merged by a random-weight ViT-B/16 at r = 8, 12, 16.

    PYTHONPATH=. python scripts/visualize_merging.py [--image chelsea] [--r 8,12,16] [--out docs/merging.png]
"""

from tome_kernels.tools.vis import main

if __name__ == "__main__":
    main()
