"""The paper's one-layer theory model, simulated on a CPU.

A world of subjects, relations and answers has FIXED token embeddings phi. One attention head
reads the sequence [subject s, relation token r] and answers from the last position:

    att_i    = softmax_i( phi(r)^T W_KQ phi(x_i) )      x = (s, r)
    out      = sum_i att_i W_V phi(x_i)
    logit(a) = phi(a)^T out                            (cross entropy over the candidate answers)

Only W_KQ and W_V train, from zero, by plain SGD. Pretraining states facts as (s, r_pre_k) -> a
with subjects drawn Zipf(zipf), so popular subjects' facts are seen far more often and stored
more strongly: their salience S(s, r, a) = phi(a)^T W_V phi(s) is higher. QA finetuning asks the
same kind of facts through another token r_qa_k per relation (cosine qa_similarity with r_pre_k),
on one subset of a train pool of subjects (top, bottom, random, whole by pretraining mentions);
testing asks the facts of held-out subjects (seen in pretraining, never finetuned) in the QA
format. Answers of a relation follow a skewed pool, so a generic relation-only guess exists:
the model can lower its loss either by attending to the subject (useful when the subject's
facts are salient) or to the relation token, whose value can hold the plausible guess.

The head, the fixed embeddings and salience are the paper's; the world around them (a statement
and a QA token per relation, skewed answer pools, plain SGD from zero, the same finetuning steps
for every subset) is factft's rendering of its setting, not checked against the paper's text.
Settings are one flat dict (a point of factft.sweeps; the schema supplies defaults).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from factft.errors import FactftError
from factft.sweeps import BASE, check_settings, dimension, split_sizes, vocabulary_size
from factft.subsets import KINDS as SUBSETS

log = logging.getLogger(__name__)

EMBEDDINGS = ("gaussian", "orthogonal")


# ---- the world --------------------------------------------------------------------


@dataclass
class World:
    """Tokens, facts and the pretraining stream of one seed.

    Token ids: subjects [0, N), pretraining relation tokens, QA relation tokens, then each
    relation's answer pool. `answers[s, k]` indexes the answer vocabulary (pools laid end to end).
    """

    embeddings: torch.Tensor  # (vocabulary, dim), fixed
    answers: torch.Tensor  # (subjects, relations) -> answer index
    stream: torch.Tensor  # (pretrain_steps * batch_size, 2): (subject, relation) per statement
    mentions: np.ndarray  # (subjects,) statements about each subject in the stream
    relations: int
    answers_per_relation: int

    @property
    def subjects(self) -> int:
        return self.answers.shape[0]

    def pretrain_token(self, relation: torch.Tensor) -> torch.Tensor:
        return self.subjects + relation

    def qa_token(self, relation: torch.Tensor) -> torch.Tensor:
        return self.subjects + self.relations + relation

    @property
    def answer_tokens(self) -> torch.Tensor:
        first = self.subjects + 2 * self.relations
        return torch.arange(first, first + self.relations * self.answers_per_relation)

    def generic_answers(self) -> torch.Tensor:
        """Each relation's most likely answer: the relation-only guess."""
        return torch.arange(self.relations) * self.answers_per_relation

    def pools(self) -> torch.Tensor:
        """(relations, answers) True where an answer belongs to the relation's pool."""
        owner = torch.arange(self.relations * self.answers_per_relation) // self.answers_per_relation
        return owner[None, :] == torch.arange(self.relations)[:, None]


def zipf_weights(n: int, exponent: float) -> torch.Tensor:
    """P(rank i) proportional to i^-exponent, i = 1..n."""
    weights = torch.arange(1, n + 1, dtype=torch.float64) ** -exponent
    return weights / weights.sum()


def make_embeddings(vocabulary: int, dim: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Unit-scale random token embeddings: Gaussian N(0, I/dim), or orthonormal rows."""
    gaussian = torch.randn(vocabulary, dim, generator=generator)
    if kind == "gaussian":
        return gaussian / dim**0.5
    if kind == "orthogonal":
        q, _ = torch.linalg.qr(torch.randn(dim, vocabulary, generator=generator))
        return q.T.contiguous()
    raise FactftError(f"simulation.settings.embedding: '{kind}' is unknown; known: {list(EMBEDDINGS)}")


def make_world(settings: dict, seed: int) -> World:
    """Embeddings, one answer per (subject, relation), and the Zipf pretraining stream."""
    generator = torch.Generator().manual_seed(seed)
    n, relations, pool = settings["subjects"], settings["relations"], settings["answers_per_relation"]
    embeddings = make_embeddings(vocabulary_size(settings), dimension(settings), settings["embedding"], generator)
    # A QA prompt shares some meaning with the statement of the same relation ("X was born in"
    # vs "Where was X born?"): its token has cosine qa_similarity with the statement token.
    pre, qa = n + torch.arange(relations), n + relations + torch.arange(relations)
    c = settings["qa_similarity"]
    embeddings[qa] = c * embeddings[pre] + (1 - c**2) ** 0.5 * embeddings[qa]
    in_pool = torch.multinomial(
        zipf_weights(pool, settings["answer_zipf"]), n * relations, replacement=True, generator=generator
    ).view(n, relations)
    answers = in_pool + torch.arange(relations) * pool

    # Every fact is stated min_mentions times; the rest of the budget follows subject popularity
    # (subject 0 is the most popular), so rare subjects are seen but weakly stored.
    budget = settings["pretrain_steps"] * settings["batch_size"]
    facts = torch.cartesian_prod(torch.arange(n), torch.arange(relations))
    guaranteed = facts.repeat(settings["min_mentions"], 1)
    drawn = budget - len(guaranteed)
    # drawn is 0 where min_mentions fills the budget (every fact equally often); multinomial refuses 0.
    subjects = (
        torch.multinomial(zipf_weights(n, settings["zipf"]), drawn, replacement=True, generator=generator)
        if drawn
        else torch.zeros(0, dtype=torch.long)
    )
    relation = torch.randint(relations, (drawn,), generator=generator)
    stream = torch.cat([guaranteed, torch.stack([subjects, relation], 1)])
    stream = stream[torch.randperm(len(stream), generator=generator)]
    mentions = np.bincount(stream[:, 0].numpy(), minlength=n)
    return World(embeddings, answers, stream, mentions, relations, pool)


def split_subjects(world: World, settings: dict, seed: int) -> dict[str, np.ndarray]:
    """Held-out test subjects, and the finetuning subsets of the remaining pool.

    Test subjects are never finetuned on: the experiment measures extraction of facts stored in
    pretraining, not facts taught by finetuning. Top/bottom rank the pool by pretraining mentions.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(world.subjects)
    n_test, size = split_sizes(settings)
    # Test subjects are drawn among those pretraining stated (all of them where min_mentions >= 1),
    # so every sweep point tests n_test subjects: a fact never seen has nothing to extract.
    seen = order[world.mentions[order] > 0]
    if len(seen) < n_test:
        raise FactftError(
            f"simulation: pretraining stated {len(seen)} of {world.subjects} subjects, fewer than the "
            f"{n_test} to test (zipf {settings['zipf']}, min_mentions {settings['min_mentions']}): "
            "raise min_mentions, pretrain_steps or batch_size"
        )
    test = np.sort(seen[:n_test])
    pool = order[~np.isin(order, test)]
    by_mentions = pool[np.argsort(-world.mentions[pool], kind="stable")]
    return {
        "top": by_mentions[:size],
        "bottom": by_mentions[len(pool) - size :],
        "random": rng.choice(pool, size, replace=False),
        "whole": pool,
        "test": test,
    }


# ---- the model --------------------------------------------------------------------


def fact_salience(w_v: torch.Tensor, phi_subject: torch.Tensor, phi_answer: torch.Tensor) -> torch.Tensor:
    """S(s, r, a) = phi(a)^T W_V phi(s), row-wise over a batch of (subject, answer) embeddings.

    How strongly the subject's value vector alone points at the answer: the relation token does
    not enter (the paper's definition), it only picks which of the subject's facts is asked.
    """
    return ((phi_subject @ w_v.T) * phi_answer).sum(-1)


class OneLayerAttention(nn.Module):
    """One attention head over fixed embeddings; W_KQ and W_V start at zero (uniform attention)."""

    def __init__(self, embeddings: torch.Tensor, answer_tokens: torch.Tensor):
        super().__init__()
        dim = embeddings.shape[1]
        self.register_buffer("phi", embeddings)
        self.register_buffer("phi_answers", embeddings[answer_tokens])
        self.w_kq = nn.Parameter(torch.zeros(dim, dim))
        self.w_v = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, subjects: torch.Tensor, relations: torch.Tensor):
        """Answer logits and the attention weight on the subject, for token-id batches."""
        s, r = self.phi[subjects], self.phi[relations]
        query = r @ self.w_kq
        scores = torch.stack([(query * s).sum(-1), (query * r).sum(-1)], -1)
        attention = scores.softmax(-1)
        out = attention[:, :1] * (s @ self.w_v.T) + attention[:, 1:] * (r @ self.w_v.T)
        return out @ self.phi_answers.T, attention[:, 0]

    def salience(self, subjects: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        return fact_salience(self.w_v, self.phi[subjects], self.phi_answers[answers])

    @torch.no_grad()
    def salience_margin(self, world: World, subjects: torch.Tensor, relations: torch.Tensor) -> torch.Tensor:
        """Salience of the true answer minus the best other answer of the relation's pool.

        Positive: the subject's value alone would answer correctly, i.e. the fact is stored.
        """
        gold = world.answers[subjects, relations]
        every = fact_salience(self.w_v, self.phi[subjects][:, None, :], self.phi_answers[None, :, :])
        true = every.gather(1, gold[:, None])[:, 0]
        others = every.masked_fill(~world.pools()[relations], float("-inf")).scatter(1, gold[:, None], float("-inf"))
        return true - others.max(1).values


def respond(model: OneLayerAttention, world: World, subjects, relations, qa: bool, candidates: str):
    """Logits and subject attention for (subject, relation) facts in QA or statement format.

    candidates "relation" scores only the relation's own answer pool: the output type is known
    from the prompt, so the subject's value need only pick among the relation's answers.
    "all" scores every answer, and the relation token must also learn which pool to answer from.
    """
    token = world.qa_token(relations) if qa else world.pretrain_token(relations)
    logits, attention = model(subjects, token)
    if candidates == "relation":
        logits = logits.masked_fill(~world.pools()[relations], float("-inf"))
    return logits, attention


def pretrain_one_layer(world: World, settings: dict) -> OneLayerAttention:
    """Train on the statement stream in order, one batch per step."""
    model = OneLayerAttention(world.embeddings, world.answer_tokens)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["pretrain_learning_rate"])
    for batch in world.stream.split(settings["batch_size"]):
        subjects, relations = batch[:, 0], batch[:, 1]
        logits, _ = respond(model, world, subjects, relations, False, settings["candidates"])
        loss = nn.functional.cross_entropy(logits, world.answers[subjects, relations])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def facts_of(world: World, subjects: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (subject, relation) fact of these subjects."""
    pairs = torch.cartesian_prod(torch.as_tensor(subjects, dtype=torch.long), torch.arange(world.relations))
    return pairs[:, 0], pairs[:, 1]


@torch.no_grad()
def ask(
    model: OneLayerAttention, world: World, subjects, relations, candidates: str, qa: bool = True
) -> dict:
    """Correctness, generic errors and subject attention for facts, in QA or statement format."""
    logits, attention = respond(model, world, subjects, relations, qa, candidates)
    gold = world.answers[subjects, relations]
    loss = nn.functional.cross_entropy(logits, gold)
    prediction = logits.argmax(-1)
    generic = world.generic_answers()[relations]
    return {
        "correct": (prediction == gold).numpy(),
        # How often the relation-only guess is given where the answer is something else.
        "generic": float((prediction[gold != generic] == generic[gold != generic]).float().mean()),
        "attention": attention.numpy(),
        "loss": float(loss),
    }


def finetune_one_layer(
    model: OneLayerAttention, world: World, subjects: np.ndarray, test: np.ndarray, settings: dict, seed: int
) -> pd.DataFrame:
    """QA-finetune on the subjects' facts; record attention and test accuracy along the way."""
    train_s, train_r = facts_of(world, subjects)
    test_s, test_r = facts_of(world, test)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings["finetune_learning_rate"])
    # The same generator seed for every subset: subsets see equally many steps and batches.
    generator = torch.Generator().manual_seed(seed)
    history = []

    def record(step):
        on_train = ask(model, world, train_s, train_r, settings["candidates"])
        on_test = ask(model, world, test_s, test_r, settings["candidates"])
        history.append(
            {
                "step": step,
                "train_loss": on_train["loss"],
                "train_accuracy": on_train["correct"].mean(),
                "train_attention_subject": on_train["attention"].mean(),
                "test_accuracy": on_test["correct"].mean(),
                "test_attention_subject": on_test["attention"].mean(),
                "test_generic": on_test["generic"],
            }
        )

    record(0)
    for step in range(1, settings["finetune_steps"] + 1):
        pick = torch.randint(len(train_s), (settings["batch_size"],), generator=generator)
        s, r = train_s[pick], train_r[pick]
        logits, _ = respond(model, world, s, r, True, settings["candidates"])
        loss = nn.functional.cross_entropy(logits, world.answers[s, r])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % settings["record_every"] == 0 or step == settings["finetune_steps"]:
            record(step)
    return pd.DataFrame(history)


# ---- one sweep point --------------------------------------------------------------


def simulate(settings: dict, seed: int, sweep: str = BASE) -> dict[str, pd.DataFrame]:
    """Pretrain once, finetune a copy on each subset, test on held-out subjects.

    Returns three tables, each tagged with sweep, the swept setting's value (none for the base
    run) and seed: `accuracy` (one row per
    subset: held-out QA accuracy overall and on the more / less mentioned half of the test
    subjects, generic answers, subject attention, and what the pretrained model stores),
    `salience` (one row per fact after pretraining) and `attention` (subject attention and
    accuracy through finetuning, per subset and recorded step).
    """
    check_settings(settings)
    world = make_world(settings, seed)
    pretrained = pretrain_one_layer(world, settings)
    splits = split_subjects(world, settings, seed)
    test = splits["test"]
    test_s, test_r = facts_of(world, test)
    # The more mentioned half of the test subjects (ties broken by subject id, i.e. Zipf rank).
    head_subjects = test[np.argsort(-world.mentions[test], kind="stable")[: (len(test) + 1) // 2]]
    head = torch.as_tensor(np.isin(test_s.numpy(), head_subjects))
    cloze = ask(pretrained, world, test_s, test_r, settings["candidates"], qa=False)["correct"]
    stored = (pretrained.salience_margin(world, test_s, test_r) > 0).numpy()
    log.info("pretrained: test facts stored %.3f, answered in statement format %.3f", stored.mean(), cloze.mean())

    accuracy, attention = [], []
    for subset in SUBSETS:
        model = copy.deepcopy(pretrained)
        history = finetune_one_layer(model, world, splits[subset], test, settings, seed)
        attention.append(history.assign(subset=subset))
        answered = ask(model, world, test_s, test_r, settings["candidates"])
        correct = answered["correct"]
        accuracy.append(
            {
                "subset": subset,
                "accuracy": correct.mean(),
                "accuracy_head": correct[head.numpy()].mean(),
                "accuracy_tail": correct[~head.numpy()].mean(),
                "generic": answered["generic"],
                "attention_subject": answered["attention"].mean(),
                "stored": stored.mean(),
                "pretrained_accuracy": cloze.mean(),
                "finetune_facts": len(splits[subset]) * world.relations,
                "finetune_mentions": world.mentions[splits[subset]].mean(),
                "test_facts": len(test_s),
            }
        )
        log.info("%s: held-out accuracy %.3f", subset, correct.mean())

    all_s, all_r = facts_of(world, np.arange(world.subjects))
    role = np.full(world.subjects, "pool", dtype=object)
    for name in ("test", "top", "bottom"):
        role[splits[name]] = name
    with torch.no_grad():
        salience = pretrained.salience(all_s, world.answers[all_s, all_r])
    margin = pretrained.salience_margin(world, all_s, all_r)
    salience = pd.DataFrame(
        {
            "subject": all_s.numpy(),
            "relation": all_r.numpy(),
            "mentions": world.mentions[all_s.numpy()],
            "salience": salience.numpy(),
            "salience_margin": margin.numpy(),
            "stored": (margin > 0).numpy(),
            "role": role[all_s.numpy()],
        }
    )
    tables = {
        "accuracy": pd.DataFrame(accuracy),
        "salience": salience,
        "attention": pd.concat(attention, ignore_index=True),
    }
    value = None if sweep == BASE else settings[sweep]
    return {name: table.assign(sweep=sweep, value=value, seed=seed) for name, table in tables.items()}
