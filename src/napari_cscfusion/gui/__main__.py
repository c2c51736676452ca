"""``python -m napari_cscfusion.gui``: open napari with the plugin's widgets docked and the
sample data loaded (what ``bash scripts/demo.sh --gui`` runs)."""

import napari


def main() -> None:
    viewer = napari.Viewer(title="napari-cscfusion")
    viewer.open_sample("napari-cscfusion", "infrared_visible")
    viewer.window.add_plugin_dock_widget("napari-cscfusion",
                                         "Infrared + visible fusion")
    viewer.window.add_plugin_dock_widget("napari-cscfusion", "Exposure fusion")
    napari.run()


if __name__ == "__main__":
    main()
