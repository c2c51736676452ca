"""`python -m napari_cscfusion.gui` (scripts/demo.sh --gui) opens napari with the widgets
docked and the infrared/visible sample loaded."""

import napari


def test_launcher_docks_widgets_and_loads_samples(monkeypatch, make_napari_viewer):
    from napari_cscfusion.gui import __main__ as launcher

    made, ran = [], []
    # napari's fixture makes (and cleans up) the viewer, so no plugin state leaks to other tests
    monkeypatch.setattr(napari, "Viewer", lambda **kw: made.append(make_napari_viewer(**kw))
                        or made[-1])
    monkeypatch.setattr(napari, "run", lambda: ran.append(True))
    launcher.main()
    viewer = made[0]
    assert ran == [True]
    names = [layer.name for layer in viewer.layers]
    assert "TNO infrared" in names and "TNO visible" in names
    docks = viewer.window.dock_widgets
    assert any("Infrared + visible fusion" in k for k in docks)
    assert any("Exposure fusion" in k for k in docks)
