"""DaniNet slice mode: a 2D conditional adversarial autoencoder for brain-ageing previews.

Re-implementation of DaniNet (Ravi, Alexander, Oxtoby, MICCAI 2019; Ravi et al., MedIA 2022),
sized for CPU training; see ``docs/daninet.md`` and ``Resources/daninet/MODEL_CARD.md`` for
what differs from the paper. Modules, one concept each::

    conditioning  age bins, diagnosis classes, slice-position code (the labels G and D_b see)
    geometry      axial slice <-> 128x128 model frame, intensity normalisation
    model         E, G, D_z, D_b and the DaniNet container (save / load)
    regressors    per-region intensity-progression regressors (targets of L_reg)
    losses        L_def, L_vox, L_reg and the adversarial terms
    data          longitudinal cohort.csv -> slice tensors
    train         training loop (checkpoints, resume, progress bar, loss curves)
    transfer      test-time transfer (quick fine-tune on the subject's baseline slice)
    preview       preview_slices(): the function the CLI and the Slicer module call
    evaluate      SSIM / PSNR / MAE of predicted slices against true follow-ups
    flow          the shipped slice-ageing model (displacement + residual per year, starts at the copy)
    flow_train    its training on a phantom cohort (alignment, pairs, checkpoints, resume)
    flow_evaluate its clean-truth evaluation (PSNR / SSIM / MAE, ventricle areas, paired CIs)
"""
