"""Reusable Keras layers; every one is a real class with `get_config`."""

from mtl_zoo.layers.calibration import (IsotonicCalibration, NegativeSamplingCorrection,
                                        PlattCalibration)
from mtl_zoo.layers.bias import BiasedOutput, BiasTower, bias_tower, train_only_inputs
from mtl_zoo.layers.dense import MLP, ExpertBank, TaskHead
from mtl_zoo.layers.fusion import FUSION_MODES, ScoreFusion, parse_fusion, score_fusion
from mtl_zoo.layers.gates import ExpertMixture, SoftmaxGate, SoftmaxGates
from mtl_zoo.layers.inputs import FeatureEmbedding, feature_embedding, schema_inputs
from mtl_zoo.layers.product import ProbabilityProduct
from mtl_zoo.layers.soft_sharing import CrossStitch, L2ConstrainedNetworks

__all__ = ["MLP", "ExpertBank", "TaskHead", "ExpertMixture", "SoftmaxGate",
           "SoftmaxGates",
           "FeatureEmbedding", "feature_embedding", "schema_inputs", "ProbabilityProduct",
           "CrossStitch", "L2ConstrainedNetworks", "ScoreFusion", "parse_fusion",
           "score_fusion", "FUSION_MODES", "IsotonicCalibration", "NegativeSamplingCorrection",
           "PlattCalibration", "BiasTower", "BiasedOutput", "bias_tower", "train_only_inputs"]
