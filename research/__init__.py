"""shallowmark.research: the analyses behind ``shallowmark analyze``, ``edit``, ``bench-core`` and
``train-default``; none of it is on the watermark's data path.

Modules: :mod:`.molrg_theory` (MoLRG posterior mean, DAE = PCA, phase transition),
:mod:`.loco_edit` (LOCO edits along the posterior-mean Jacobian's singular vectors),
:mod:`.jacobian_rank` (the rank-profile analysis and its report; the profile and ``auto_t_star``
themselves live in :mod:`shallowmark.core.t_star`), :mod:`.reproducibility` and
:mod:`.descriptors` (RP and GL scores), :mod:`.train_default` (training the embedded tiny-ldm),
:mod:`.foundation_report` and :mod:`.pca_codec` (``bench-core``), :mod:`.threads`.

Research imports core; core never imports research.
"""
