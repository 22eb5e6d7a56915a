"""Image transforms: the train and eval pipelines (``pipelines``) over PIL operations (``ops``), RandAugment
and random erasing with timm's semantics, the consistent left/right pair transform of dual-eye data
(``dual``) and the fundus preprocessing (``fundus``). Modules inside import each other, never this file.
"""
from util.transforms.dual import build_dual_transform
from util.transforms.fundus import FundusReader, build_preprocess
from util.transforms.pipelines import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, build_transform

__all__ = ['IMAGENET_DEFAULT_MEAN', 'IMAGENET_DEFAULT_STD', 'build_transform', 'build_dual_transform', 'FundusReader',
           'build_preprocess']
