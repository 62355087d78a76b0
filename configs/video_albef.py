"""Video ALBEF on the built-in `moving_shapes` clips: the ALBEF recipe (ITC with
momentum distillation + ITM + MLM) with configs/video_clip.py's data, vision
tower temporal modeling and schedule.

    mmjax train --config configs/video_albef.py:divided --workdir workdirs/video_albef

The fusion layers cross-attend to every token of the clip. The argument picks the
temporal modeling as in video_clip.py.
"""

import os

from mmjax import config as config_lib

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg=None):
    c = config_lib.recipe(os.path.join(HERE, "albef.py"))
    video = config_lib.recipe(os.path.join(HERE, "video_clip.py"), arg)
    c.data, c.finetune = video.data, video.finetune
    for key in ("temporal", "tubelet", "temporal_kernel", "local_temporal"):  # model.num_frames: derived
        c.model[key] = video.model[key]
    c.train.batch_size, c.train.steps, c.train.ckpt_every = (
        video.train.batch_size,
        video.train.steps,
        video.train.ckpt_every,
    )
    c.eval.every, c.eval.batch_size = video.eval.every, video.eval.batch_size
    return c
