"""Datasets: speech corpora split into named parts."""
