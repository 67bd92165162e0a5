"""Multiply-accumulates per token, with the exit decision's own cost counted.

Full depth costs every block plus the final head. An early exit at layer k costs k blocks,
every decision taken on the way (exit head or its low-rank stand-in, hidden-state features,
the classifier), plus the head that produces the token unless the full exit head already did.
Pure Python: shared by the runtime, calibration and evaluation.

Classification (a policy with label words): the answer is the label word with the highest
logit, so the head that produces it is the *label head* (final norm + |labels| rows of the LM
head), at full depth too: the full-depth reference is every block plus the label head, and an
early exit saves only blocks, never the vocabulary-sized head a plain model would have run.
"""

from __future__ import annotations

from dataclasses import dataclass

from .manifest import Manifest

#: a cosine similarity and a norm ratio of two hidden vectors: ~4 multiply-accumulates per element
HIDDEN_FEATURE_MACS_PER_ELEMENT = 4


@dataclass(frozen=True)
class TokenCost:
    blocks: int
    decisions: int
    head: int
    fill: int = 0  # key/value projections that fill the layers an exit skipped

    @property
    def total(self) -> int:
        return self.blocks + self.decisions + self.head + self.fill

    @property
    def excluding_decision(self) -> int:
        return self.blocks + self.head + self.fill


def fill_macs(manifest: Manifest, exit_layer: int) -> int:
    """Filling the caches of layers exit_layer+1 .. L from the exit state (CALM's propagation)."""
    return sum(manifest.macs.kv_fill[exit_layer:]) if manifest.macs.kv_fill else 0


def blocks_macs(manifest: Manifest, layers: int, context: int) -> int:
    return sum(manifest.macs.blocks[i].at(context) for i in range(layers))


def full_depth_macs(manifest: Manifest, context: int) -> int:
    return blocks_macs(manifest, manifest.num_layers, context) + manifest.macs.final_head


def label_head_macs(manifest: Manifest, labels: int) -> int:
    """Final norm (~2 per element) + the label words' columns of the LM head."""
    return manifest.hidden_size * (labels + 2)


def probe_macs(manifest: Manifest, labels: int) -> int:
    """One internal classifier: a (hidden x labels) MatMul + bias, softmax over the labels."""
    return manifest.hidden_size * labels + 2 * labels


def answer_head_macs(manifest: Manifest, policy) -> int:
    """The head that turns the last hidden state into the answer: label head or full LM head."""
    labels = len(getattr(policy, "label_token_ids", ()) or ())
    return label_head_macs(manifest, labels) if labels else manifest.macs.final_head


def full_answer_macs(manifest: Manifest, context: int, policy=None) -> int:
    """Full depth for the same task: every block plus the answer head."""
    head = answer_head_macs(manifest, policy) if policy is not None else manifest.macs.final_head
    return blocks_macs(manifest, manifest.num_layers, context) + head


def answered_by_decision(manifest: Manifest, policy) -> bool:
    """Whether an early exit's own decision already produced the answer (no head runs after it)."""
    if policy.decision == "probe" or policy.head == "label":
        return True
    if getattr(policy, "label_token_ids", None):
        return False  # a full-vocabulary top-1 is not the label-word answer
    return policy.head == "full" and decision_macs(manifest, policy) >= manifest.macs.exit_head


def decision_macs(manifest: Manifest, policy) -> int:
    """Cost of one decision under `policy` (an ExitPolicy)."""
    if policy.decision in ("never", "forced"):
        return 0
    if policy.decision == "probe":
        return probe_macs(manifest, len(policy.label_token_ids))
    cost = 0
    head_needed = any(f in ("gap", "top_prob") for f in policy.features)
    if head_needed and policy.head == "label":
        cost += label_head_macs(manifest, len(policy.label_token_ids))
    elif head_needed and policy.head == "full":
        cost += manifest.macs.exit_head
    elif head_needed and policy.head == "lowrank":
        rank = int(policy.extras["rank"])
        cost += rank * (manifest.hidden_size + manifest.vocab_size)
    if any(f in ("cos_prev", "norm_ratio") for f in policy.features):
        cost += HIDDEN_FEATURE_MACS_PER_ELEMENT * manifest.hidden_size
    cost += int(policy.extras.get("classifier_macs", len(policy.features)))
    return cost


def token_cost(manifest: Manifest, policy, exit_layer: int, context: int) -> TokenCost:
    """MACs for one token that left the chain after block `exit_layer` (1-based)."""
    evaluations = [l for l in policy.evaluated_layers(manifest.num_layers) if l <= exit_layer]
    decisions = len(evaluations) * decision_macs(manifest, policy)
    exited_with_answer = (exit_layer < manifest.num_layers and exit_layer in evaluations
                          and answered_by_decision(manifest, policy))
    head = 0 if exited_with_answer else answer_head_macs(manifest, policy)
    return TokenCost(blocks=blocks_macs(manifest, exit_layer, context), decisions=decisions, head=head)
