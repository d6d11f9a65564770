"""The bottom-up-attention Faster R-CNN (ResNet C4, Visual Genome heads), built natively on torch and
torchvision ops with detectron2's parameter names, so both published checkpoints load by name.

One module per job: ``conventions`` (the two published checkpoints' numerics), ``backbone`` (caffe
ResNet + frozen BN), ``anchors``, ``box_coder``, ``rpn``, ``roi_heads``, ``selection`` (which boxes
become "the" features), ``preprocess`` (each checkpoint's input, as its extractor resizes it),
``detector`` (assembly, never padding), ``extract`` (a batch -> each image's regions, one at a time),
``checkpoint`` (name mapping and strict loading).
"""
