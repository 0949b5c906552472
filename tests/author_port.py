"""A literal port of the MMS author's phase 1 (the loop the paper's MMS results were made with),
to test `manifold_mixing_soup(variant="author")` against. Test helper only, never the library.

Ported from github.com/hfassold/manifold_mixing_model_soups (commit 49276b1), folder manifoldmixms/:

- JrsPhase1.py, class Context: `run` (the candidate loop, with the second and third optimizer
  pass), `doOptimization`, `evalFunctionWithLambda`, `getStateDictForApproxAvgModel`,
  `getFusedModelStateDictFromLambda`, `getFusedModelStateDictFromBeta`, `convertLambdaToBeta`;
- JrsContext.py: `sortIngredientModelsByAccuracy` (ascending sort, then reversed);
- JrsUtilModel.py: `groupStateDictKeysByLevel` (without its special cases) and
  `getComponentInfoForLayer`.

Kept as the author wrote them: the statements, their order and their arithmetic (torch tensors
times numpy scalars, λ* cast to float32, accuracy = 1 - the recommendation's loss). Replaced: the
hydra config by arguments (the released C8 run's values are the defaults), the CLIP model and its
data loaders by `val_acc(state_dict) -> float`, the logger by `self.log`. Left out, as they do not
change the result: the adaptive subsampling (a no-op with segment_size 1000 and under 1000 models),
candidate modes other than 0, and the "near miss" averages (computed and logged after a rejection,
never used by a decision).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import nevergrad as ng
import numpy as np


def group_state_dict_keys_by_level(model_state_dict, default_level=0):
    """JrsUtilModel.groupStateDictKeysByLevel, without `specialCases`."""
    result_components = OrderedDict()
    result_indices = OrderedDict()
    for key_str in model_state_dict:
        key_tokens = key_str.split(".")
        level_to_use = min(default_level, len(key_tokens) - 1)
        prefix = ".".join(key_tokens[0 : level_to_use + 1])
        if prefix not in result_components:
            result_indices[prefix] = len(result_components)
            result_components[prefix] = []
        result_components[prefix].append(key_str)
    return result_components, result_indices


def get_component_info_for_layer(layer_name, components, components_indices):
    """JrsUtilModel.getComponentInfoForLayer."""
    for component in components:
        if layer_name in components[component]:
            return component, components_indices[component]
    return "<<ERR_LAYER_NOT_FOUND>>", -1


def sort_ingredients_by_accuracy(val_accs: dict[str, float]) -> tuple[list[str], list[float]]:
    """JrsContext.sortIngredientModelsByAccuracy: ascending by accuracy, then reversed."""
    items = sorted(val_accs.items(), key=lambda kv: kv[1])
    items.reverse()
    return [x[0] for x in items], [x[1] for x in items]


class AuthorPhase1:
    """JrsPhase1.Context with its config as arguments (defaults: the released C8 run's)."""

    def __init__(
        self,
        models: dict[str, dict],  # name -> state dict ("<ingredients_root>/<name>.pt")
        model_val_accs: dict[str, float],  # name -> ValAcc (individual_model_results.jsonl)
        val_acc: Callable[[dict], float],  # calcModelAccuracy(getModelFromStateDict(sd))
        component_granularity: int = 1,
        tau: float = 0.998,
        max_func_evals_per_dim: int = 30,
        bounds_delta: float = 0.5,
        random_seed: int = 123456789,
        do_potential_second_optimizer_pass: bool = True,
    ):
        self.models, self.val_acc = models, val_acc
        self.tau, self.max_func_evals_per_dim = tau, max_func_evals_per_dim
        self.bounds_delta, self.random_seed = bounds_delta, random_seed
        self.do_potential_second_optimizer_pass = do_potential_second_optimizer_pass
        self.sortedIngredientModels, self.sortedIngredientModelsValAcc = (
            sort_ingredients_by_accuracy(model_val_accs)
        )
        self.numberModels = len(self.sortedIngredientModels)
        sample = self.loadStateDictForSortedModelWithIndex(0)
        self.components, self.componentsIndices = group_state_dict_keys_by_level(
            sample, component_granularity
        )
        self.numberComponents = len(self.components)
        self.ingredientIndices: list[int] = []
        self.beta = None
        self.fusedModelStateDict = None
        self.log: list[tuple] = []  # what the author's logger would write, as tuples
        self.optimizer_names: list[str] = []
        self.optimizer = None
        self.n_evals = 0

    def loadStateDictForSortedModelWithIndex(self, idx):
        return self.models[self.sortedIngredientModels[idx]]

    def run(self):
        idxTakeAlways = 0
        candidateIndicesToInspect = list(range(1, self.numberModels))
        self.ingredientIndices.append(idxTakeAlways)
        A = self.loadStateDictForSortedModelWithIndex(idxTakeAlways)
        accuracyA = self.val_acc(A)
        lambdaAll = None
        for idx in candidateIndicesToInspect:
            C = self.loadStateDictForSortedModelWithIndex(idx)
            accuracyApproxAvgModel = self.val_acc(self.getStateDictForApproxAvgModel(A, C))
            self.log.append(("approx", idx, accuracyA, accuracyApproxAvgModel))
            if accuracyApproxAvgModel >= self.tau * accuracyA:
                K = len(self.ingredientIndices)
                lambdaStart = np.ones(shape=(1, self.numberComponents)) * (K / (K + 1))
                lambdaOpt, accuracyOpt = self.doOptimization(A, C, lambdaStart)
                if accuracyOpt >= accuracyA:
                    if self.do_potential_second_optimizer_pass:
                        accuracyOptBefore = accuracyOpt
                        lambdaOpt, accuracyOpt = self.doOptimization(
                            A, C, lambdaOpt, isFirstPass=False
                        )
                        if accuracyOpt >= (1.0 + 0.3 * (1.0 - self.tau)) * accuracyOptBefore:
                            lambdaOpt, accuracyOpt = self.doOptimization(
                                A, C, lambdaOpt, isFirstPass=False
                            )
                    self.ingredientIndices.append(idx)
                    A = self.getFusedModelStateDictFromLambda(A, C, lambdaOpt)
                    accuracyA = accuracyOpt
                    if lambdaAll is None:
                        lambdaAll = lambdaOpt
                    else:
                        lambdaAll = np.vstack([lambdaAll, lambdaOpt])
                    self.log.append(("accepted", idx))
                else:
                    self.log.append(("rejected", idx))
            else:
                self.log.append(("skipped", idx))
        self.lambdaAll = lambdaAll
        self.beta = self.convertLambdaToBeta(lambdaAll)
        self.fusedModelStateDict = self.getFusedModelStateDictFromBeta(
            self.ingredientIndices, self.beta
        )
        self.finalAccumA, self.accuracyA = A, accuracyA
        return self

    def close(self):
        """Not the author's: stop the last optimizer's scipy thread (it would block the exit)."""
        self.optimizer = None
        return self

    def evalFunctionWithLambda(self, lambta):
        A1 = self.getFusedModelStateDictFromLambda(self.tmp_A, self.tmp_C, lambta)
        accuracy = self.val_acc(A1)
        self.n_evals += 1  # not the author's: counts evaluations
        fnVal = 1.0 - accuracy
        return fnVal

    def doOptimization(self, A, C, lambdaStart, isFirstPass=True):
        maxFunctionCallsTotal = self.numberComponents * self.max_func_evals_per_dim
        if isFirstPass:
            deltaForLambda = self.bounds_delta * (1 - lambdaStart[0, 0])
            lambdaBounds = [lambdaStart[0, 0] - deltaForLambda, lambdaStart[0, 0] + deltaForLambda]
        else:
            lambdaBounds = [0.3, 1.0]
            lambdaStart = np.clip(lambdaStart, lambdaBounds[0], lambdaBounds[1])
        ngParamLambta = ng.p.Array(init=lambdaStart, lower=lambdaBounds[0], upper=lambdaBounds[1])
        instrumentation = ng.p.Instrumentation(lambta=ngParamLambta)
        instrumentation.random_state.seed(self.random_seed)
        self.optimizer = ng.optimizers.NGOpt(
            parametrization=instrumentation, budget=maxFunctionCallsTotal
        )
        self.optimizer_names.append(self.optimizer.optim.name)
        self.tmp_A = A
        self.tmp_C = C
        ngParamLambtaOpt = self.optimizer.minimize(self.evalFunctionWithLambda, verbosity=0)
        dummy, paramOpt = ngParamLambtaOpt.value
        lamtaOpt = paramOpt["lambta"].astype(np.float32)
        accuracyOpt = 1.0 - ngParamLambtaOpt.loss
        self.log.append(("pass", accuracyOpt))
        return lamtaOpt, accuracyOpt

    def getStateDictForApproxAvgModel(self, A, C):
        approxAvg = dict()
        K = len(self.ingredientIndices)
        factorA = K / (K + 1.0)
        for currLayer in A:
            approxAvg[currLayer] = A[currLayer].cpu().clone() * factorA + C[
                currLayer
            ].cpu().clone() * (1.0 - factorA)
        return approxAvg

    def getFusedModelStateDictFromLambda(self, A, C, lambta):
        newA = dict()
        for currLayer in A:
            _, idx = get_component_info_for_layer(
                currLayer, self.components, self.componentsIndices
            )
            lambta_i = lambta[0, idx]
            newA[currLayer] = A[currLayer].cpu().clone() * lambta_i + C[currLayer].cpu().clone() * (
                1.0 - lambta_i
            )
        return newA

    def getFusedModelStateDictFromBeta(self, ingredientIndices, betaMat):
        fusedModelStateDict = dict()
        for counter in range(len(ingredientIndices)):
            currModelStateDict = self.loadStateDictForSortedModelWithIndex(
                ingredientIndices[counter]
            )
            for currLayer in currModelStateDict:
                _, idx = get_component_info_for_layer(
                    currLayer, self.components, self.componentsIndices
                )
                beta = betaMat[counter, idx]
                if counter == 0:
                    fusedModelStateDict[currLayer] = (
                        currModelStateDict[currLayer].cpu().clone() * beta
                    )
                else:
                    fusedModelStateDict[currLayer] = (
                        fusedModelStateDict[currLayer].cpu().clone()
                        + currModelStateDict[currLayer].cpu().clone() * beta
                    )
        return fusedModelStateDict

    def convertLambdaToBeta(self, lambaAll):
        numberIngredients = len(self.ingredientIndices)
        if numberIngredients == 1:
            return np.ones(shape=(1, self.numberComponents))
        beta = np.zeros(shape=(numberIngredients, self.numberComponents))
        k = numberIngredients - 2
        p = np.zeros_like(beta)
        s = np.zeros_like(beta)
        for j in range(0, numberIngredients):
            for i in range(0, self.numberComponents):
                product = 1.0
                for idx in range(j, k + 1):
                    product = product * lambaAll[idx, i]
                p[j, i] = product
                s[j, i] = 1.0 - lambaAll[j - 1, i] if j > 0 else 1.0
                beta[j, i] = p[j, i] * s[j, i]
        return beta
