require ["copy", "variables"];
set :lower :upperfirst "who" "ANN";
if string :is "${who}" "Ann" { redirect :copy "ann@example.org"; }
if true { redirect "archive@pop.contoso.test"; }
