"""InBrainSyn engine: individual brain-ageing synthesis from one T1-weighted MRI.

Floors, bottom to top (lower floors never import higher ones)::

    io            read / validate / write images and fields atomically (ITK geometry kept)
    fields        THE warp convention: SVF exponential, composition, Jacobian, Lie bracket
    registration  affine (SimpleITK) and SVF instance optimisation (torch)
    transport     parallel transport of SVFs (pole, schild, conjugation, ...)
    templates     template bank format, atrophy model, default bank
    synthesis     the pipeline: subject -> template space -> transported ageing -> outputs
    cli           the ``inbrainsyn`` command
"""

__version__ = "0.1.0"
