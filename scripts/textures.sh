# Sourced by the benchmark scripts: where each texture photograph is, and which other
# texture a test set's foreign-texture patches come from.
texture_path() {
  case "$1" in
    gravel) echo data/textures/gravel.png ;;
    *) echo ../shared/data/textures/$1.png ;;
  esac
}
foreign_of() {
  case "$1" in
    brick) echo grass ;;
    grass) echo gravel ;;
    gravel) echo brick ;;
  esac
}
