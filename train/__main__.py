"""``python -m visionpe.train`` (also the torchrun entry: ``torchrun ... -m visionpe.train --config ...``)."""
import sys

from .finetune import main

sys.exit(main())
