"""Tests of workers.runtime: the environment of predictor processes."""

from __future__ import annotations

from workers.runtime import with_hugepage_tunable


def test_hugepage_tunable_added_to_empty_environment():
    assert with_hugepage_tunable({}) == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}


def test_hugepage_tunable_keeps_other_tunables():
    env = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert with_hugepage_tunable(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}


def test_explicit_hugetlb_setting_is_respected():
    env = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert with_hugepage_tunable(env) == env
