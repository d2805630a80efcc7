"""Configuration: Detectron2's defaults plus this project's keys.

Every key of a feature is declared in one ``add_*_config`` function; ``get_cfg()``
applies them all. A YAML file or override naming a key declared nowhere fails with
Detectron2's ``KeyError: 'Non-existent config key: ...'``.

Importing this module registers every model of the project in Detectron2's registries
(as Detectron2 projects do), so ``build_model(get_cfg())`` finds ``ALRPRetinaNet`` & co.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as _detectron2_get_cfg

from . import modeling  # noqa: F401  (registers the models)
from .data.sampling import ASPECT_RATIO_BINS

__all__ = [
    "add_alrp_config",
    "add_augmentation_config",
    "add_data_config",
    "add_engine_config",
    "add_foveabox_config",
    "add_ranking_loss_config",
    "add_rcnn_config",
    "add_reporting_config",
    "get_cfg",
    "model_num_classes",
]


def add_alrp_config(cfg: CN) -> None:
    """aLRP Loss and the detectors trained by it (``MODEL.ALRP``)."""
    cfg.MODEL.ALRP = CN()
    cfg.MODEL.ALRP.DELTA = 1.0  # smoothing of the step function
    cfg.MODEL.ALRP.EPS = 1e-5  # positives with N_FP <= EPS get no classification update
    cfg.MODEL.ALRP.TAU = 0.5  # IoU of a true positive; normalises the localisation error
    cfg.MODEL.ALRP.LOC_ERROR = "giou"  # "iou" or "giou"
    cfg.MODEL.ALRP.SB_INIT = 50.0  # self-balance weight until the first epoch ends
    # APHeadLoss: its box loss (MODEL.RETINANET.BBOX_REG_LOSS_TYPE) times a self-balance
    # weight, as aLRP Loss's (from SB_INIT; the paper's Table S4), instead of 1
    cfg.MODEL.ALRP.AP_SELF_BALANCE = False
    cfg.MODEL.ALRP.ASSIGNER = "iou"  # anchor assignment of ALRPRetinaNet: "iou" or "atss"
    cfg.MODEL.ALRP.ATSS_TOPK = 9  # anchors per pyramid level nearest to each ground truth
    cfg.MODEL.ALRP.RPN_LOSS_WEIGHT = 0.2  # Faster R-CNN: weight of the RPN's aLRP loss
    cfg.MODEL.ALRP.RPN_TAU = 0.7  # Faster R-CNN: TAU of the RPN
    cfg.MODEL.ALRP.VALIDATE_INPUTS = False  # re-check loss inputs each step (costs a sync)
    # Which anchors are ranked together: "process" (the images of each process, as the
    # authors' code ranks those of each GPU) or "global" (the whole batch of every process:
    # the loss then does not depend on the number of processes; costs O(P) communication).
    cfg.MODEL.ALRP.RANKING_SCOPE = "process"
    # IoU assignment of ALRPRetinaNet / APLossRetinaNet and of MaxIoURPN / ALRPRPN, by the
    # authors' rule: a ground truth's best anchors become positive where that IoU reaches:
    cfg.MODEL.ALRP.MIN_POS_IOU = 0.0
    cfg.MODEL.ALRP.RPN_MIN_POS_IOU = 0.3
    # Test-time candidates per level of ALRPRetinaNet / APLossRetinaNet: "pairs" (Detectron2:
    # top (anchor, class) pairs above the threshold) or "anchors" (the authors': top anchors
    # by best class score, then their classes above the threshold)
    cfg.MODEL.ALRP.TEST_CANDIDATES = "pairs"


def add_ranking_loss_config(cfg: CN) -> None:
    """The choice of a head's ranking loss (``MODEL.RANKING_LOSS``).

    ``NAME``: ``ALRPHeadLoss``, ``APHeadLoss``, ``RankSortHeadLoss`` (or a HeadLoss of your
    own registered in ``alrp_d2.modeling.HEAD_LOSS_REGISTRY``) for the generic ``RankingRetinaNet``,
    ``RankingRPN`` and ``RankingROIHeads``; empty for the names that fix their loss
    (``ALRPRetinaNet``, ``RankSortRPN``, ...), which refuse a ``NAME`` that contradicts them.
    Each loss reads its own keys (``MODEL.ALRP``, ``MODEL.RANK_SORT``); what they share is here:
    ``RANKING_SCOPE`` (``process`` or ``global``) for every loss, empty for the older key it
    aliases, ``MODEL.ALRP.RANKING_SCOPE`` (which keeps working; the two set to different
    scopes is refused by name).
    """
    cfg.MODEL.RANKING_LOSS = CN()
    cfg.MODEL.RANKING_LOSS.NAME = ""
    cfg.MODEL.RANKING_LOSS.RANKING_SCOPE = ""
    # RankingFCOS (its head reads MODEL.RETINANET's keys): anchor points within this many
    # strides of a ground truth's centre may be positive (Detectron2's FCOS default)
    cfg.MODEL.FCOS = CN()
    cfg.MODEL.FCOS.CENTER_SAMPLING_RADIUS = 1.5


def add_foveabox_config(cfg: CN) -> None:
    """FoveaBox (``RankingFoveaBox``, ``MODEL.FOVEABOX``): which objects a pyramid level
    learns and where. Its head reads ``MODEL.RETINANET``'s keys, its loss
    ``MODEL.RANKING_LOSS.NAME``. Defaults: the aLRP authors' FoveaBox configs.

    - ``BASE_EDGES``: per level (``MODEL.RETINANET.IN_FEATURES``), the length in pixels
      that the level's box distances are measured in (predicted as their logarithm).
    - ``SCALE_RANGES``: per level, ``(lower, upper)``: a ground truth with
      ``lower <= sqrt(w h) <= upper`` is learnt on that level (the ranges overlap, so an
      object may be learnt on two levels).
    - ``SIGMA``: the fovea, the part of a ground truth whose locations are its positives:
      the box shrunk about its centre to ``SIGMA`` times its width and height (0 < SIGMA <= 1).
    """
    cfg.MODEL.FOVEABOX = CN()
    cfg.MODEL.FOVEABOX.BASE_EDGES = (16, 32, 64, 128, 256)
    cfg.MODEL.FOVEABOX.SCALE_RANGES = ((1, 64), (32, 128), (64, 256), (128, 512), (256, 2048))
    cfg.MODEL.FOVEABOX.SIGMA = 0.4


def add_rank_sort_config(cfg: CN) -> None:
    """Rank & Sort Loss and the detectors trained by it (``MODEL.RANK_SORT``).

    ``RankSortRetinaNet`` also reads ``MODEL.ALRP.ASSIGNER``, ``ATSS_TOPK``, ``MIN_POS_IOU``
    and ``TEST_CANDIDATES`` (the anchor labelling and test-time candidates it shares with
    the aLRP RetinaNet), ``RankSortRPN`` reads ``MODEL.ALRP.RPN_MIN_POS_IOU``, and every
    Rank & Sort head ``MODEL.ALRP.RANKING_SCOPE`` (the ranking scope of all ranking heads).
    """
    cfg.MODEL.RANK_SORT = CN()
    cfg.MODEL.RANK_SORT.DELTA = 0.5  # smoothing of the step function
    cfg.MODEL.RANK_SORT.EPS = 1e-10  # positives with N_FP (or D) <= EPS get no update
    cfg.MODEL.RANK_SORT.RPN_LOSS_WEIGHT = 0.2  # Faster/Mask R-CNN: weight of the RPN's losses
    # RankSortRetinaNet: box deltas times a learnable scale per level (the authors' ATSS head)
    cfg.MODEL.RANK_SORT.LEARNED_BOX_SCALES = False
    # RankSortMaskHead: at most this many random positives per process train the masks (0: all)
    cfg.MODEL.RANK_SORT.MAX_MASKS = 0
    cfg.MODEL.RANK_SORT.VALIDATE_INPUTS = False  # re-check loss inputs each step (costs a sync)


def add_rcnn_config(cfg: CN) -> None:
    """The R-CNN parts of the Rank & Sort authors' models that Detectron2 has no key for.

    - ``MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS``: ``RankingCascadeROIHeads`` multiplies
      each stage's losses by its weight (mmdetection's ``stage_loss_weights``; one per
      ``MODEL.ROI_BOX_CASCADE_HEAD.IOUS``). Detectron2's ``CascadeROIHeads`` does not read it
      (it sums the stages' losses and scales the gradient into the features by 1 / stages).
    - ``MODEL.CARAFE``: the content-aware upsampling of ``build_carafe_resnet_fpn_backbone``
      (mmdetection's ``FPN_CARAFE``, the authors' "+" models): reassembly kernels of
      ``UP_KERNEL`` x ``UP_KERNEL`` in ``UP_GROUP`` channel groups, predicted by a
      ``ENCODER_KERNEL`` convolution (dilation ``ENCODER_DILATION``) of the features
      compressed to ``COMPRESSED_CHANNELS``.
    """
    cfg.MODEL.ROI_BOX_CASCADE_HEAD.STAGE_LOSS_WEIGHTS = (1.0, 1.0, 1.0)
    cfg.MODEL.CARAFE = CN()
    cfg.MODEL.CARAFE.UP_KERNEL = 5
    cfg.MODEL.CARAFE.UP_GROUP = 1
    cfg.MODEL.CARAFE.ENCODER_KERNEL = 3
    cfg.MODEL.CARAFE.ENCODER_DILATION = 1
    cfg.MODEL.CARAFE.COMPRESSED_CHANNELS = 64


def add_augmentation_config(cfg: CN) -> None:
    """The paper's SSD-style training augmentation (``INPUT.ALRP_AUG``)."""
    cfg.INPUT.ALRP_AUG = CN()
    cfg.INPUT.ALRP_AUG.ENABLED = False
    cfg.INPUT.ALRP_AUG.PHOTOMETRIC = True
    cfg.INPUT.ALRP_AUG.EXPAND_RATIO = (1.0, 4.0)  # (1, 1) disables expansion
    cfg.INPUT.ALRP_AUG.MIN_IOUS = (0.1, 0.3, 0.5, 0.7, 0.9)
    cfg.INPUT.ALRP_AUG.MIN_CROP_SIZE = 0.3
    cfg.INPUT.ALRP_AUG.SIZE = (512, 512)  # (height, width) after the crop; 800x800 at 800
    cfg.INPUT.ALRP_AUG.FLIP = True


def add_engine_config(cfg: CN) -> None:
    """Epoch-based training with PyTorch Lightning (``SOLVER``, ``TEST``).

    With ``SOLVER.MAX_EPOCHS > 0`` training is counted in epochs: ``SOLVER.MAX_ITER``
    and ``SOLVER.STEPS`` are derived from ``MAX_EPOCHS`` and ``STEPS_EPOCHS``, and
    ``TEST.EVAL_PERIOD`` counts epochs. Warm-up stays in iterations.

    Redeclared Detectron2 keys (their unit changes):

    - ``SOLVER.CHECKPOINT_PERIOD``: numbered checkpoints ``checkpoints/epochNNN.ckpt``
      every this many *epochs* (0: none), whether or not validation runs. Detectron2's
      default (5000, in iterations) would silently mean "never"; the default here is 10.
    - ``TEST.EVAL_PERIOD``: evaluation every this many *epochs* (0: only at the end).

    New: ``SOLVER.CHECKPOINT_ITERS``: ``last.ckpt`` every this many iterations inside an
    epoch as well as at each epoch's end (0: epoch ends only). The default, 1000, cuts a
    COCO epoch at batch 32 (3697 iterations) into four parts.
    """
    cfg.SOLVER.MAX_EPOCHS = 0
    cfg.SOLVER.STEPS_EPOCHS = ()
    cfg.SOLVER.CHECKPOINT_PERIOD = 10
    cfg.SOLVER.CHECKPOINT_ITERS = 1000
    cfg.TEST.LRP_EVALUATOR = True  # evaluate optimal LRP beside COCO AP


def add_data_config(cfg: CN) -> None:
    """The training images of an epoch (``DATALOADER``).

    Detectron2's keys work as in Detectron2, in epochs: ``ASPECT_RATIO_GROUPING`` (batches
    of landscape or of portrait images only), ``SAMPLER_TRAIN`` (``TrainingSampler`` or
    ``RepeatFactorTrainingSampler``; the others are refused by name), ``REPEAT_THRESHOLD``
    and ``REPEAT_SQRT`` (Detectron2's repeat factors, from category frequencies).

    New: ``ASPECT_RATIO_BINS``, the ``width / height`` edges between the aspect-ratio groups
    of ``ASPECT_RATIO_GROUPING``: ``(1.0,)`` is Detectron2's two groups (landscape, and the
    rest); the default also separates the common photo formats (9:16 to 16:9), so that a
    batch of 4:3 images is not padded to the width of a 16:9 one (``benchmarks/padding.py``).

    New: ``REPEAT_ROUNDING``, how ``RepeatFactorTrainingSampler`` turns a fractional repeat
    factor ``r`` into copies of an image in an epoch: ``stochastic`` (Detectron2's:
    ``floor(r)``, plus one with probability ``r - floor(r)``, drawn each epoch; an epoch
    then has ``ceil(sum r)`` images) or ``ceil`` (mmdetection's ``ClassBalancedDataset``,
    which the Rank & Sort authors' LVIS config uses: ``ceil(r)`` every epoch).
    """
    cfg.DATALOADER.ASPECT_RATIO_BINS = ASPECT_RATIO_BINS
    cfg.DATALOADER.REPEAT_ROUNDING = "stochastic"


def add_reporting_config(cfg: CN) -> None:
    """What a run reports while it trains (``SOLVER.LOG_PERIOD``, ``TEST.BEST_CHECKPOINT``).

    - ``SOLVER.LOG_PERIOD``: a Detectron2-style line (iteration, epoch, losses, lr, time,
      data time, ETA, GPU memory) in ``log.txt`` and on the console every this many
      iterations.
    - ``TEST.BEST_CHECKPOINT.METRIC``: after every evaluation, the model is saved as
      ``OUTPUT_DIR/model_best.pth`` when this flattened metric (``bbox/AP``, ``bbox/AP50``,
      ``lrp/oLRP``, ...) is the best of the run so far ("": never). ``MODE``: ``max``,
      ``min`` or ``auto`` (``min`` for ``lrp/*``, lower is better; ``max`` otherwise).
    """
    cfg.SOLVER.LOG_PERIOD = 20
    cfg.TEST.BEST_CHECKPOINT = CN()
    cfg.TEST.BEST_CHECKPOINT.METRIC = "bbox/AP"
    cfg.TEST.BEST_CHECKPOINT.MODE = "auto"


def get_cfg() -> CN:
    """Detectron2's default config with every key of this project."""
    cfg = _detectron2_get_cfg()
    add_alrp_config(cfg)
    add_ranking_loss_config(cfg)
    add_rank_sort_config(cfg)
    add_foveabox_config(cfg)
    add_rcnn_config(cfg)
    add_augmentation_config(cfg)
    add_engine_config(cfg)
    add_data_config(cfg)
    add_reporting_config(cfg)
    return cfg


def model_num_classes(cfg: CN) -> int:
    """How many classes the config's model predicts: ``MODEL.ROI_HEADS.NUM_CLASSES`` for
    Detectron2's R-CNNs, ``MODEL.RETINANET.NUM_CLASSES`` for the one-stage detectors
    (RetinaNet and the ranking-loss detectors built on it, Detectron2's FCOS)."""
    if cfg.MODEL.META_ARCHITECTURE in ("GeneralizedRCNN", "ProposalNetwork"):
        return cfg.MODEL.ROI_HEADS.NUM_CLASSES
    return cfg.MODEL.RETINANET.NUM_CLASSES
