"""The genetic neighbourhood of LORE and ABELE (Guidotti et al.), vectorised over the population.

Both methods breed two populations from copies of the instance x: one rewarded for neighbours
the black box labels as x's class ("same"), one for neighbours it labels otherwise
("different"), with DEAP's simple GA (tournament selection, two-point crossover, mutation and a
hall of fame). LORE's genes are superpixel bits, ABELE's are latent coordinates: the caller
supplies the fitness and the mutation, this module the loop.
"""
from __future__ import annotations

from typing import Callable, Generator

import numpy as np


def _coin(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.random(n) < 0.5


def two_point_crossover(pop: np.ndarray, cxpb: float, rng: np.random.Generator) -> np.ndarray:
    """Swap a random slice between consecutive pairs, each pair with probability cxpb (in place).

    Returns a bool [n] of the rows that changed hands (they need a new fitness)."""
    n, s = pop.shape
    pairs = np.flatnonzero(rng.random(n // 2) < cxpb)
    cuts = np.sort(rng.integers(0, s + 1, (len(pairs), 2)), axis=1)
    cols = np.arange(s)
    swap = (cols >= cuts[:, :1]) & (cols < cuts[:, 1:])  # [pairs, S]
    a, b = 2 * pairs, 2 * pairs + 1
    pa, pb = pop[a].copy(), pop[b].copy()
    pop[a] = np.where(swap, pb, pa)
    pop[b] = np.where(swap, pa, pb)
    touched = np.zeros(n, dtype=bool)
    touched[a] = touched[b] = True
    return touched


def resample_genes(pop: np.ndarray, rows: np.ndarray, indpb: float, rng: np.random.Generator,
                   draw: Callable[[np.random.Generator, int], np.ndarray] = _coin) -> None:
    """In the rows marked by bool ``rows`` [n], redraw each gene with probability indpb (in place).

    draw(rng, k) gives k new gene values: fair coins for bits (default), N(0,1) for latents."""
    resample = (rng.random(pop.shape) < indpb) & rows[:, None]
    pop[resample] = draw(rng, int(resample.sum()))


def mutate(pop: np.ndarray, mutpb: float, indpb: float, rng: np.random.Generator,
           draw: Callable[[np.random.Generator, int], np.ndarray] = _coin) -> np.ndarray:
    """Each row with probability mutpb redraws each gene with probability indpb (in place).

    Returns the bool [n] of rows picked for mutation."""
    rows = rng.random(len(pop)) < mutpb
    resample_genes(pop, rows, indpb, rng, draw)
    return rows


def above_largest_gap(fitness: np.ndarray) -> np.ndarray:
    """LORE's filter: keep the individuals whose fitness is above the largest gap in the sorted values."""
    values = np.unique(fitness)
    if len(values) < 2:
        return np.ones(len(fitness), dtype=bool)
    cut = values[np.argmax(np.diff(values)) + 1]
    return fitness >= cut


Reply = tuple  # per-row black-box answers, each an array with one entry per requested row
Fitness = Callable[[np.ndarray, Reply, bool], np.ndarray]


def evolve(x: np.ndarray, rng: np.random.Generator, *, size: int, generations: int, cxpb: float,
           tournament_size: int, fitness: Fitness,
           mutate: Callable[[np.ndarray, np.random.Generator], object]
           ) -> Generator[np.ndarray, Reply, list[np.ndarray]]:
    """The two populations of a LORE-style neighbourhood, as a generator.

    x: the instance [d]. Both populations start as ``size`` copies of x; each generation
    does tournament selection, two-point crossover (cxpb) and ``mutate(pop, rng)`` (in
    place) per population, then yields both populations stacked [2*size, d] and receives
    the black box's reply for them (a tuple of per-row arrays), from which
    ``fitness(pop, reply_rows, same)`` scores each. A hall of fame keeps the best 10%
    distinct individuals seen. Returns, per population ("same", "different"), the members
    of the final population and the hall of fame above the largest fitness gap.
    """
    pops = [np.repeat(x[None], size, 0), np.repeat(x[None], size, 0)]

    def score(reply):
        return [fitness(pops[0], tuple(r[:size] for r in reply), True),
                fitness(pops[1], tuple(r[size:] for r in reply), False)]

    fits = score((yield np.concatenate(pops)))
    fame = [(pops[k].copy(), fits[k].copy()) for k in range(2)]
    for _ in range(generations):
        for k in range(2):
            aspirants = rng.integers(0, size, (size, tournament_size))
            winners = aspirants[np.arange(size), np.argmax(fits[k][aspirants], axis=1)]
            pops[k] = pops[k][winners]
            fits[k] = fits[k][winners]
            two_point_crossover(pops[k], cxpb, rng)
            mutate(pops[k], rng)
        fits = score((yield np.concatenate(pops)))
        for k in range(2):  # hall of fame: the best distinct individuals seen, 10% of a population
            pool = np.concatenate([fame[k][0], pops[k]])
            pool_fit = np.concatenate([fame[k][1], fits[k]])
            _, first = np.unique(pool, axis=0, return_index=True)
            best = first[np.argsort(-pool_fit[first], kind="stable")[:max(1, size // 10)]]
            fame[k] = (pool[best], pool_fit[best])
    kept = []
    for k in range(2):
        pool = np.concatenate([pops[k], fame[k][0]])
        kept.append(pool[above_largest_gap(np.concatenate([fits[k], fame[k][1]]))])
    return kept
