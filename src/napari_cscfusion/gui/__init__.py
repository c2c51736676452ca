"""The napari layer of napari-cscfusion: dock widgets, reader, writer and sample data.

Only this package imports napari or Qt; every computation is done by ``napari_cscfusion.engine``.
Widgets (see ``napari.yaml``): ``InfraredVisibleWidget``, ``MultiExposureWidget``,
``GuidedSRWidget``, ``FusionQualityWidget``. New fusion widgets subclass ``_base.FusionWidget``.
"""
